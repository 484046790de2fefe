"""Profiles on request: jax.profiler traces of chosen train steps, from a run and from the bench."""

import glob
import gzip
import json
import os
import subprocess
import sys

from cli_helpers import REPO, run_train, train_env


def _trace_steps(directory: str) -> set[int]:
  """Step numbers of the "train" step annotations in the Perfetto trace under ``directory``."""
  files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
  assert files, f"no trace under {directory}: {os.listdir(directory)}"
  assert glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
  events = json.loads(gzip.open(files[0]).read())["traceEvents"]
  steps = set()
  for event in events:
    if event.get("name") == "train" and "step_num" in event.get("args", {}):
      steps.add(int(event["args"]["step_num"]))
  return steps


def test_a_run_profiles_the_steps_it_is_asked_to(tmp_path, cache_dir):
  workdir = str(tmp_path / "w")
  result = run_train(workdir, "--config.log.profile_steps=(3, 5)", cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "profile of steps 3-5 written to" in result.stderr
  assert _trace_steps(os.path.join(workdir, "profile")) == {3, 4, 5}


def test_bench_writes_a_profile(tmp_path):
  out = str(tmp_path / "profile")
  result = subprocess.run(
    [sys.executable, "-m", "train.bench", "--config=configs/tiny.py", "--steps=2", "--warmup=1",
     f"--profile={out}"],
    cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["tokens_per_second"] > 0
  assert _trace_steps(out) == {1, 2}
