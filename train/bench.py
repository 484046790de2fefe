"""``python -m train.bench [--config configs/bench_r.py] [--what step|input]``.

``--what step`` (default) measures this process's devices' matmul peak, then the real compiled
train step (the trainer's own, sharded over the config's mesh) on synthetic tokens of the config's
shapes: compile time, then the median step time over ``--steps`` steps after warm-up, tokens/s and
MFU against the measured peak. ``--what input`` measures the input pipeline alone from a prepared
store. Either way the last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags
from ml_collections import config_flags

import configs

_CONFIG = config_flags.DEFINE_config_file(
  "config", os.path.join(os.path.dirname(configs.__file__), "bench_r.py"), "Config file."
)
_WHAT = flags.DEFINE_enum("what", "step", ["step", "input"], "What to measure.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")


def synthetic_batch(config, vocab_size: int, sharding, seed: int = 0):
  """Random tokens in one segment per row: the shapes and dtypes of a real batch."""
  import jax
  import jax.numpy as jnp

  shape = (config.train.batch_size, config.data.seq_len)
  tokens = jax.random.randint(jax.random.key(seed), (shape[0], shape[1] + 1), 0, vocab_size)
  batch = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "positions": jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape),
    "segment_ids": jnp.ones(shape, jnp.int32),
    "weights": jnp.ones(shape, jnp.float32),
  }
  return {
    k: jax.device_put(v.astype(jnp.float32 if k == "weights" else jnp.int32), sharding)
    for k, v in batch.items()
  }


def bench_step(config, steps: int, warmup: int) -> dict:
  import jax
  import jax.numpy as jnp

  from input_pipeline.tokenizers import ByteTokenizer
  from models.config import ModelConfig
  from train import flops, trainer
  from train import mesh as mesh_lib
  from train import state as state_lib

  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  vocab = config.model.vocab_size if config.model.vocab_size > 0 else ByteTokenizer.vocab_size
  model_cfg = ModelConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=vocab)
  tx, spec, batch_sharding, train_step, _, meter = trainer.build_steps(
    config, mesh, rules, model_cfg
  )
  state = state_lib.init_state(spec, model_cfg, tx, mesh, rules, config.seed)
  batch = synthetic_batch(config, model_cfg.vocab_size, batch_sharding)
  for _ in range(warmup):
    state, metrics = train_step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  tokens_per_second = config.train.batch_size * config.data.seq_len / step_time
  # The peak again, after the steps: a shared or throttling machine can read low either time, and
  # MFU against the higher of the two readings is the conservative figure.
  peak_after = flops.measure_matmul_peak(dtype=jnp.dtype(model_cfg.dtype), repeats=20)
  peak_after *= jax.process_count() if jax.devices()[0].platform == "cpu" else jax.device_count()
  meter.peak_flops_per_second = max(meter.peak_flops_per_second, peak_after)
  return {
    "tokens_per_second": tokens_per_second,
    "step_time_s": step_time,
    "step_time_min_s": min(times),
    "step_time_max_s": max(times),
    "mfu": meter.mfu(tokens_per_second),
    "flops_per_token": meter.flops_per_token,
    "peak_flops_per_second": meter.peak_flops_per_second,
    "compile_time_s": meter.seconds["compile"],
    "devices": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    "mesh": mesh_lib.describe(mesh),
    "final_loss": float(metrics["train/loss"]),
    "config": json.loads(config.to_json_best_effort()),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if _WHAT.value == "input":
    from input_pipeline import benchmark

    result = benchmark.measure_input(config, steps=_STEPS.value)
    result["config"] = json.loads(config.to_json_best_effort())
  else:
    result = bench_step(config, _STEPS.value, _WARMUP.value)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
