"""Running ``python -m train`` as a user would, for the end-to-end tests."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(workdir, *overrides, cache_dir, config="configs/tiny.py"):
  return [
    sys.executable,
    "-m",
    "train",
    f"--workdir={workdir}",
    f"--config={config}",
    f"--config.data.cache_dir={cache_dir}",
    *overrides,
  ]


def train_env(devices: int = 8) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run_train(workdir, *overrides, cache_dir, devices=8, timeout=300, config="configs/tiny.py"):
  return subprocess.run(
    train_command(workdir, *overrides, cache_dir=cache_dir, config=config),
    cwd=REPO,
    env=train_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(records):
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r and "event" not in r}
