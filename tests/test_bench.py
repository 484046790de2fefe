"""python -m train.bench on its own default config (R), as the README tells users to run it."""

import json
import subprocess
import sys

from cli_helpers import REPO, train_env


def test_bench_runs_config_r_and_prints_its_json():
  # One CPU device, as a user's plain run has; R's 256 ids are fed synthetic tokens.
  result = subprocess.run(
    [sys.executable, "-m", "train.bench", "--steps=1", "--warmup=0"],
    cwd=REPO, env=train_env(devices=1), capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["config"]["model"]["vocab_size"] == 256 and report["tokens_per_second"] > 0
  assert report["peak_source"].startswith("measured")
