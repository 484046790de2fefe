"""``python -m train.rl.digits_dpo --workdir DIR``: the DPO demonstration (configs/dpo_digits.py).

The task of ``digits.py`` (three random digits and ">", the answer is the first digit) as
preference pairs: the chosen completion is the answer, the rejected one another digit. Writes the
pairs into ``DIR/prefs/`` (800 prompts' pairs to train on, 100 other prompts held out), trains with
DPO from random weights, then prints at each checkpoint the pairs' rewards/accuracies (logged in
training) and how many held-out prompts the model's greedy answer gets right, starting with the
reference's (the starting weights), and the wall time.
"""

import json
import os
import time

import jax
import numpy as np
from absl import flags

from input_pipeline.host import command, storage
from train import trainer
from train.checkpoint import manager
from train.inference import generation, loading
from train.rl import rollout

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, report.")
flags.mark_flag_as_required("workdir")

USAGE = "usage: python -m train.rl.digits_dpo --workdir DIR [--config.KEY=VALUE ...]"


def write_pairs(directory: str, seed: int = 0) -> tuple[str, list[str], list[str]]:
  """The train pairs' file, and the held-out prompts with their answers (other numbers)."""
  rng = np.random.default_rng(seed)
  numbers = rng.permutation(1000)
  lines = []
  for n in numbers[:800]:
    digits = f"{int(n):03d}"
    wrong = str((int(digits[0]) + rng.integers(1, 10)) % 10)  # any other digit
    lines.append(json.dumps({"prompt": f"{digits}>", "chosen": digits[0], "rejected": wrong}))
  path = os.path.join(directory, "train.jsonl")
  rollout.write_demo_file(path, lines)
  held_out = [f"{int(n):03d}" for n in numbers[800:900]]
  return path, [f"{d}>" for d in held_out], [d[0] for d in held_out]


def greedy_exact_match(model: loading.Model, prompts: list[str], answers: list[str]) -> float:
  out = generation.generate(
    model, prompts, max_new_tokens=1, temperature=0.0, measure_bandwidth=False
  )
  return float(np.mean([text == answer for text, answer in zip(out.texts, answers, strict=True)]))


def main(argv: list[str]) -> int:
  del argv
  config = command.config()
  workdir = str(storage.absolute(_WORKDIR.value))
  directory = os.path.join(workdir, "prefs")
  os.makedirs(directory, exist_ok=True)
  path, prompts, answers = write_pairs(directory, config.seed)
  with config.unlocked():
    config.data.source = f"prefs:{path}"
  started = time.perf_counter()
  report = trainer.train_and_evaluate(config, workdir)
  trained = time.perf_counter() - started
  accuracies = {}
  for line in (storage.absolute(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "train/rewards/accuracies" in record:
      accuracies[record["step"]] = record["train/rewards/accuracies"]
  steps = manager.open_read_only(workdir)[1]
  first = loading.load(workdir, steps[0], weights="reference")
  start = greedy_exact_match(first, prompts, answers)
  if jax.process_index() == 0:
    shown = sorted(s for s in accuracies if s == 1 or s % 5 == 0)
    curve = "  ".join(f"{step}: {accuracies[step]:.2f}" for step in shown)
    print(f"train rewards/accuracies by step  {curve}")
    print(f"start (the reference)  held-out greedy exact match {start:.2f}")
  for step in steps:
    exact = greedy_exact_match(loading.load(workdir, step), prompts, answers)
    logged = [s for s in accuracies if s <= step]
    accuracy = f"{accuracies[max(logged)]:.2f}" if logged else "n/a"
    if jax.process_index() == 0:
      print(
        f"step {step:4d}  train rewards/accuracies {accuracy}  held-out greedy exact match "
        f"{exact:.2f}"
      )
  if jax.process_index() == 0:
    print(f"wall time {time.perf_counter() - started:.0f} s ({trained:.0f} s training)")
  return command.EXIT_PREEMPTED if report["preempted"] else command.EXIT_OK


if __name__ == "__main__":
  command.run(main, usage=USAGE, config_default="dpo_digits.py")
