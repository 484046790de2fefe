"""Profiles on request: jax.profiler traces of chosen train steps, from a run and from the bench."""

import glob
import gzip
import json
import os

from configs import tiny
from train import bench


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


def test_a_run_profiles_the_steps_it_is_asked_to(tiny_run):
  workdir, stderr = tiny_run  # the shared tiny run asks for a profile of steps 3-5
  assert "profile of steps 3-5 written to" in stderr
  assert _trace_steps(os.path.join(workdir, "profile")) == {3, 4, 5}


def test_bench_writes_a_profile(tmp_path):
  # The session's peak (tests/conftest.py), as --peak=given takes it: no matmul readings.
  out = str(tmp_path / "profile")
  result = bench.bench_step(tiny.get_config(), steps=2, warmup=1, profile_dir=out, peak="given")
  assert result["tokens_per_second"] > 0 and result["peak_source"].startswith("given")
  assert _trace_steps(out) == {1, 2}
