"""``python -m train.rl.digits --workdir DIR``: the GRPO demonstration (configs/grpo_digits.py).

Writes the task's prompt files into ``DIR/prompts/`` (three random digits and ">", the answer is
the first digit; 800 prompts to train on, 100 others held out), runs GRPO on them and prints the
held-out reward at each eval and the wall time.
"""

import json
import os
import time

import numpy as np
from absl import flags

from input_pipeline.host import command, storage
from train.rl import loop, rollout

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, report.")
flags.mark_flag_as_required("workdir")

USAGE = "usage: python -m train.rl.digits --workdir DIR [--config.KEY=VALUE ...]"


def write_prompts(directory: str, seed: int = 0) -> tuple[str, str]:
  """The train and held-out prompt files: disjoint sets of three-digit strings."""
  numbers = np.random.default_rng(seed).permutation(1000)
  paths = []
  for name, chosen in (("train", numbers[:800]), ("held_out", numbers[800:900])):
    lines = []
    for n in chosen:
      digits = f"{int(n):03d}"
      lines.append(json.dumps({"prompt": f"{digits}>", "answer": digits[0], "format": "[0-9]"}))
    path = os.path.join(directory, f"{name}.jsonl")
    rollout.write_demo_file(path, lines)
    paths.append(path)
  return paths[0], paths[1]


def main(argv: list[str]) -> int:
  del argv
  config = command.config()
  directory = os.path.join(str(storage.absolute(_WORKDIR.value)), "prompts")
  os.makedirs(directory, exist_ok=True)
  with config.unlocked():
    config.rl.prompts, config.rl.eval_prompts = write_prompts(directory, config.seed)
  started = time.perf_counter()
  report = loop.train_and_evaluate(config, _WORKDIR.value)
  metrics = storage.absolute(_WORKDIR.value) / "metrics.jsonl"
  for line in metrics.read_text().splitlines():
    record = json.loads(line)
    if "eval/reward" in record:
      exact, fmt = record["eval/rewards/exact_match"], record["eval/rewards/format_match"]
      print(f"step {record['step']:4d}  held-out exact match {exact:.2f}  format {fmt:.2f}")
  print(f"wall time {time.perf_counter() - started:.0f} s")
  return command.EXIT_PREEMPTED if report["preempted"] else command.EXIT_OK


if __name__ == "__main__":
  command.run(main, usage=USAGE, config_default="grpo_digits.py")
