"""Input-pipeline speed: tokens per second delivered by `train_batches` from a prepared store.

Wired into `python -m train.bench --what input` by the trainer; measures this process's numpy
batches only (no device transfer), after a short warm-up that fills tf.data's prefetch buffers.
"""

import time

import ml_collections

from input_pipeline import pipeline

_WARMUP_STEPS = 5


def measure_input(config: ml_collections.ConfigDict, steps: int) -> dict:
  """Prepares (or reuses) the store, then times `steps` train batches at config.train.batch_size."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  start = time.perf_counter()
  pipe = pipeline.build_local(config)
  build_s = time.perf_counter() - start
  batch_size = int(config.train.batch_size)
  batches = pipe.train_batches(global_batch_size=batch_size, process_index=0, process_count=1)
  for _ in range(_WARMUP_STEPS):
    next(batches)
  tokens = 0
  start = time.perf_counter()
  for _ in range(steps):
    tokens += next(batches)["inputs"].size
  elapsed = time.perf_counter() - start
  return {
    "input_tokens_per_second": tokens / elapsed,
    "packing_efficiency": pipe.manifest["packing_efficiency"],
    "steps": steps,
    "batch_size": batch_size,
    "seq_len": pipe.seq_len,
    "build_time_s": build_s,
    "prepare_time_s": pipe.manifest["prepare_seconds"],
    "train_rows": pipe.store.num_rows("train"),
    "fingerprint": pipe.fingerprint,
  }
