"""Running ``python -m train`` as a user would, for the end-to-end tests."""

import json
import os
import shutil
import subprocess
import sys

import fork_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The overrides of the session's shared tiny run (conftest.py: tiny_run): a profile of steps 3-5.
TINY_RUN = ("--config.log.profile_steps=(3, 5)",)


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


def train_env(devices: int = 8, *, user_compile: bool = False) -> dict:
  """The environment of a command the tests start: ``devices`` CPU devices. It compiles with the
  session's flags (conftest.py: fast compiles, slower code) unless ``user_compile``, for a
  command whose run outweighs its compile (config R's bench: 53 -> 47 s in a whole-suite run;
  the GRPO demonstration: 45 -> 35 CPU-s), which then compiles as a user's does."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  if user_compile:
    env["LOOM_TESTS_XLA_FLAGS"] = ""
  return env


def run_train(
  workdir, *overrides, cache_dir, devices=8, timeout=300, config="configs/tiny.py", fresh=False
):
  """``python -m train`` to its end: a fork of the worker's fork server (tests/fork_server.py),
  or with ``fresh`` a new interpreter, as a user starts it."""
  return (subprocess.run if fresh else fork_server.run)(
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


def tiny_config(cache_dir, overrides: dict | None = None):
  """configs/tiny.py with ``{"group.key": value}`` overrides, as ``--config.group.key=value``
  would give them to ``python -m train``."""
  from configs import tiny

  config = tiny.get_config()
  config.data.cache_dir = str(cache_dir)
  config.log.progress = False
  for key, value in (overrides or {}).items():
    group, name = key.split(".")
    config[group][name] = value
  return config


def train_in_process(workdir, cache_dir, overrides: dict | None = None) -> dict:
  """``python -m train`` on configs/tiny.py, in this process: the report of the run."""
  from train import trainer

  return trainer.train_and_evaluate(tiny_config(cache_dir, overrides), str(workdir))


def copy_run(source, target, *without_steps: int) -> str:
  """A copy of a run's work directory, less the checkpoints of ``without_steps``."""
  import shutil

  shutil.copytree(source, target)
  for step in without_steps:
    shutil.rmtree(os.path.join(target, "checkpoints", str(step)))
  return str(target)


def resume_from_step_10(reference, workdir, *overrides, cache_dir):
  """A copy of the run in ``reference`` without its step-20 checkpoint, resumed from step 10
  to step 20 with ``overrides`` (logging every step). Returns the finished process."""
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
  result = run_train(workdir, "--config.log.every=1", *overrides, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "at step 10" in result.stderr
  return result


class _Request:  # an lm-eval request: its arguments
  def __init__(self, *args):
    self.args = args


def scores_and_greedy_text(workdir):
  """The final checkpoint of ``workdir`` loaded for inference: lm-eval log-likelihoods of two
  requests (the harness adapter) and six greedy tokens after "def " (the generation engine)."""
  from train.inference import generation, harness, loading

  model = loading.load(workdir)
  requests = [_Request("def f(x):", " return x"), _Request("import os", "\nimport sys")]
  scores = [score for score, _ in harness.loom_lm(model, 4).loglikelihood(requests)]
  return model, scores, generation.generate(model, ["def "], max_new_tokens=6, temperature=0.0)
