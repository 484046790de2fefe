"""``python -m train.evaluate --workdir DIR [--step N] --tasks T1,T2 [--limit K] [--num_fewshot F]
[--include_path DIR] [--batch_size B]``: EleutherAI lm-eval harness tasks on a Loom checkpoint.

A thin command over ``train/inference/harness.py``. Results go to ``DIR/eval/<step>.json`` and,
as ``harness/<task>/<metric>``, to the run's ``metrics.jsonl`` at that step; the last line
printed is one JSON object (the results, requests, requests/s). Runs on every process of a
cluster (``--coordinator_address`` ...); process 0 writes and prints.

Offline (no dataset hub): define tasks by YAML files with local data and pass their folder as
``--include_path`` (the harness's own flag); or point the harness at a pre-downloaded Hugging Face
datasets cache with ``HF_DATASETS_CACHE=/path HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import jax
from absl import flags

from input_pipeline.host import command
from train.inference import harness, loading

flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("tasks", None, "Comma-separated lm-eval task names.", required=True)
flags.DEFINE_float("limit", None, "Documents per task: a count (>= 1) or a fraction (< 1).")
flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's own).")
flags.DEFINE_string("include_path", None, "A folder of task YAML files (lm-eval's flag).")
flags.DEFINE_integer("batch_size", 16, "Requests scored per batch (all processes together).")

USAGE = "usage: python -m train.evaluate --workdir DIR --tasks T1,T2 [--limit K] [...]"


def main(argv: Sequence[str]) -> int:
  f = flags.FLAGS
  command.quiet_libraries()
  tasks = [t.strip() for t in f.tasks.split(",") if t.strip()]
  if not tasks:
    raise ValueError(f"--tasks={f.tasks!r} names no task; pass T1,T2,...")
  if f.include_path and not os.path.isdir(f.include_path):
    raise FileNotFoundError(f"--include_path {f.include_path}: no such directory")
  if f.limit is not None and not f.limit > 0:
    raise ValueError(f"--limit={f.limit} must be a count >= 1 or a fraction in (0, 1)")
  if f.num_fewshot is not None and f.num_fewshot < 0:
    raise ValueError(f"--num_fewshot={f.num_fewshot} must be >= 0 (leave it out: the task's own)")
  if f.batch_size < 1:
    raise ValueError(f"--batch_size={f.batch_size} must be >= 1")
  limit = None if f.limit is None else (int(f.limit) if f.limit >= 1 else f.limit)
  harness.check_tasks(tasks, f.include_path)  # before the model is loaded
  model = loading.load(f.workdir, f.step)
  try:
    results = harness.run_tasks(
      model,
      tasks,
      include_path=f.include_path,
      limit=limit,
      num_fewshot=f.num_fewshot,
      batch_size=f.batch_size,
    )
  except ConnectionError as e:  # a task's dataset on the Hub, with no network here
    raise ValueError(
      f"a task's dataset could not be fetched ({type(e).__name__}: {e}); with no network, give "
      "HF_DATASETS_CACHE a cache that holds it and set HF_DATASETS_OFFLINE=1 "
      "(docs/evaluation.md), or use local task files with --include_path"
    ) from e
  if jax.process_index() == 0:
    harness.write(f.workdir, results)
    for name, value in sorted(results["metrics"].items()):
      print(f"{name}: {value:.4f}", file=sys.stderr)
    # The tasks' full configs stay in the file; the printed line keeps the results.
    print(json.dumps({k: v for k, v in results.items() if k != "configs"}), flush=True)
  return command.EXIT_OK


if __name__ == "__main__":
  command.run(main, usage=USAGE, bad_input=(ValueError, FileNotFoundError, ImportError))
