"""``python -m train.bench [--config configs/bench_r.py] [--what step|input]``.

``--what step`` (default) compiles the trainer's own train step (sharded over the config's mesh)
and runs it on synthetic tokens of the config's shapes: compile time, then ``--steps`` steps after
warm-up timed end to end with one synchronisation (``step_time_s``; the spread of a few steps
timed one by one beside it), tokens/s and MFU against the peak the trainer uses
(``train/meter/flops.py``: the datasheet on TPUs and GPUs, a measured matmul on CPUs). On a CPU
the bench measures that matmul before and after the steps (``--peak=measure``, ~10 CPU-s);
``--peak=given`` takes ``LOOM_CPU_PEAK_FLOPS`` instead, as a training run does: one fixed
denominator for the MFUs of a sweep of benches on one machine, each without the readings.
``--what matmuls`` runs the same step's matmuls and nothing else (every projection's forward, input
gradient and weight gradient, the unembedding, the attention scores and values by the config's
query blocks) as one program of independent dots on random operands: the floor the step's time
cannot go below on this backend's matmul library, to set beside ``step_time_s``.
``--what input`` measures the input pipeline alone from a prepared store. The last line printed is
one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import numpy as np
from absl import flags

from input_pipeline import benchmark
from input_pipeline.device import row_share, to_global
from input_pipeline.host import command
from input_pipeline.host.command import LoomError
from train import config as config_lib
from train import profiling, trainer
from train import state as state_lib
from train.cluster import mesh as mesh_lib
from train.meter import flops

PEAK_CHOICES = ("measure", "given")

_WHAT = flags.DEFINE_enum("what", "step", ["step", "matmuls", "input"], "What to measure.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_enum(
  "peak",
  "measure",
  PEAK_CHOICES,
  f"On a CPU: measure the matmul peak before and after the steps, or take {flops.PEAK_VARIABLE}.",
)
_PROFILE = flags.DEFINE_string(
  "profile", None, "Trace the timed steps into this directory (timings then include the profiler)."
)


def synthetic_batch(config, vocab_size: int, sharding, seed: int = 0):
  """Random tokens in one segment per row: the shapes and dtypes of a real batch."""
  # Every process draws the same global batch and hands over only its block of rows, as the input
  # pipeline does (input_pipeline.device.to_global: make_array_from_process_local_data).
  shape = (config.train.batch_size, config.data.seq_len)
  tokens = np.asarray(
    jax.random.randint(jax.random.key(seed), (shape[0], shape[1] + 1), 0, vocab_size), np.int32
  )
  batch = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
    "segment_ids": np.ones(shape, np.int32),
    "weights": np.ones(shape, np.float32),
  }
  index, count = row_share(sharding)  # this process's block of the rows
  rows = shape[0] // count
  mine = slice(index * rows, (index + 1) * rows)
  return to_global({k: np.ascontiguousarray(v[mine]) for k, v in batch.items()}, sharding)


def check_peak(peak: str, config) -> None:
  """A LoomError, before anything is compiled, where ``--peak=given`` has no peak to take: on a
  CPU at float32 it needs ``LOOM_CPU_PEAK_FLOPS`` (a float32 figure, so no other dtype)."""
  if peak not in PEAK_CHOICES:
    raise LoomError(f"--peak={peak}: must be one of {', '.join(PEAK_CHOICES)}")
  if peak == "measure" or jax.devices()[0].platform != "cpu":
    return  # accelerators take the datasheet peak either way
  dtype = config.model.dtype
  if np.dtype(dtype) != np.float32:  # flops.run_peak's rule: the given figure is float32's
    raise LoomError(
      f"--peak=given: {flops.PEAK_VARIABLE} is a float32 matmul peak and model.dtype={dtype!r}; "
      "use --peak=measure"
    )
  if flops.given_cpu_peak() is None:
    raise LoomError(
      f"--peak=given: {flops.PEAK_VARIABLE} is not set; set it to a float32 matmul peak measured "
      "on this machine (FLOP/s, e.g. the peak_flops_per_second of a bench's or run's report), "
      "or use --peak=measure"
    )


def bench_step(
  config, steps: int, warmup: int, profile_dir: str | None = None, peak: str = "measure"
) -> dict:
  """``--what step``: ``peak`` is ``--peak`` (measure, or given: ``check_peak``)."""
  check_peak(peak, config)
  # Synthetic tokens: no tokenizer feeds this step (config R's 256 ids are below the byte
  # tokenizer's 258), so the vocabulary is not checked against one.
  resolved = config_lib.validate(config, with_tokenizer=False)
  model_cfg = resolved.model_cfg
  measure = peak == "measure"
  mesh, rules = resolved.mesh, resolved.rules
  built = trainer.build_steps(config, mesh, rules, model_cfg, measure_peak=measure)
  programs, meter = built.programs, built.meter
  state = state_lib.init_state(programs.spec, model_cfg, programs.tx, mesh, rules, config.seed)
  batch = synthetic_batch(config, model_cfg.vocab_size, programs.batch_sharding)
  for _ in range(warmup):
    state, metrics = built.compiled_step(state, batch)
  jax.block_until_ready(state)
  # End to end: the steps dispatched back to back and one synchronisation at the end, so the
  # device queue stays full as in training (with the training loop's bound on steps in flight)
  # and host latency is neither hidden nor added.
  sync_each_step = mesh_lib.bound_steps_in_flight()
  profiler = profiling.StepProfiler(profile_dir or "", 1 if profile_dir else None, steps)
  start = time.perf_counter()
  for i in range(1, steps + 1):
    with profiler.step(i, lambda: state):  # noqa: B023 (this step's new state, on exit)
      state, metrics = built.compiled_step(state, batch)
      if sync_each_step:
        jax.block_until_ready(metrics)
  jax.block_until_ready((state, metrics))
  step_time = (time.perf_counter() - start) / steps
  # The per-step spread, separately: a few more steps, each timed to its own completion.
  times = []
  for _ in range(min(steps, 5)):
    start = time.perf_counter()
    state, metrics = built.compiled_step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  tokens_per_second = config.train.batch_size * config.data.seq_len / step_time
  if measure and jax.devices()[0].platform == "cpu":
    # The peak again, after the steps: a shared or throttling machine can read low either time,
    # and MFU against the higher of the two readings is the conservative figure.
    after = flops.run_peak(model_cfg.dtype, repeats=20, use_given=False).flops_per_second
    meter.peak_flops_per_second = max(meter.peak_flops_per_second, after)
  return {
    "tokens_per_second": tokens_per_second,
    "step_time_s": step_time,  # end to end, one synchronisation
    "step_time_min_s": min(times),  # the spread: steps timed one by one
    "step_time_max_s": max(times),
    "step_time_median_synced_s": statistics.median(times),
    "mfu": meter.mfu(tokens_per_second),
    "flops_per_token": meter.flops_per_token,
    "peak_flops_per_second": meter.peak_flops_per_second,
    "peak_source": meter.peak_source,
    "compile_time_s": meter.seconds["compile"],
    "devices": jax.device_count(),
    "device_kind": jax.devices()[0].device_kind,
    "mesh": mesh_lib.describe(resolved.mesh),
    "final_loss": float(metrics["train/loss"]),
    "config": json.loads(config.to_json_best_effort()),
  }


def step_matmuls(cfg, batch: int, length: int) -> list[tuple]:
  """The train step's dots as (batch dims, m, k, n, lhs stored [k, m], rhs stored [n, k]), in
  the layouts the step has them: y = x·W, dx = dy·Wᵀ and dW = xᵀ·dy of each projection over
  all tokens, and per (row, head) the blocked attention's forward (q·kᵀ, p·v) and backward
  (dp = do·vᵀ, dq = ds·k, dk = dsᵀ·q, dv = pᵀ·do)."""
  tokens, d, f = batch * length, cfg.d_model, cfg.mlp_dim
  n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  kernels = [(d, n * h), (d, kv * h), (d, kv * h), (n * h, d), (d, f), (f, d)]
  if cfg.mlp == "swiglu":
    kernels.append((d, f))
  dots = []
  for fan_in, fan_out in kernels * cfg.num_layers + [(d, cfg.vocab_size)]:
    dots.append(((), tokens, fan_in, fan_out, False, False))
    dots.append(((), tokens, fan_out, fan_in, False, True))
    dots.append(((), fan_in, tokens, fan_out, True, False))
  block = cfg.attention_block if 0 < cfg.attention_block < length else length
  heads = (batch, n)
  for lo in range(0, length, block):
    q, keys = min(block, length - lo), min(lo + block, length)
    per_layer = [
      (heads, q, h, keys, False, True), (heads, q, keys, h, False, False),  # forward
      (heads, q, h, keys, False, True), (heads, q, keys, h, False, False),  # dp, dq
      (heads, keys, q, h, True, False), (heads, keys, q, h, True, False),  # dk, dv
    ]  # fmt: skip
    dots += per_layer * cfg.num_layers
  return dots


def bench_matmuls(config, repeats: int) -> dict:
  """Times ``step_matmuls`` of the config as one jitted program (median of ``repeats``)."""
  cfg = config_lib.validate(config, with_tokenizer=False).model_cfg
  dots = step_matmuls(cfg, config.train.batch_size, config.data.seq_len)
  rngs = iter(jax.random.split(jax.random.key(0), 2 * len(dots)))
  operands = []
  for batch_dims, m, k, n, lhs_t, rhs_t in dots:
    for shape in ((k, m) if lhs_t else (m, k), (n, k) if rhs_t else (k, n)):
      operands.append(jax.random.normal(next(rngs), (*batch_dims, *shape), cfg.dtype))

  @jax.jit
  def run(*operands):
    outs = []
    for i, (batch_dims, _, _, _, lhs_t, rhs_t) in enumerate(dots):
      b = tuple(range(len(batch_dims)))
      contract = ((len(b) + (0 if lhs_t else 1),), (len(b) + (1 if rhs_t else 0),))
      outs.append(jax.lax.dot_general(operands[2 * i], operands[2 * i + 1], (contract, (b, b))))
    return outs

  def flop(batch_dims, m, k, n, *_):
    return 2 * int(np.prod(batch_dims, dtype=np.int64)) * m * k * n

  jax.block_until_ready(run(*operands))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(*operands))
    times.append(time.perf_counter() - start)
  total = sum(flop(*dot) for dot in dots)
  seconds = statistics.median(times)
  return {
    "matmul_time_s": seconds,
    "matmul_time_min_s": min(times),
    "matmul_flops": total,
    "matmuls": len(dots),
    "flops_per_second": total / seconds,
    "tokens_per_second_bound": config.train.batch_size * config.data.seq_len / seconds,
    "device_kind": jax.devices()[0].device_kind,
  }


def main(argv: list[str]) -> int:
  config = command.config()
  if _WHAT.value == "input":
    result = benchmark.measure_input(config, steps=_STEPS.value)
    result["config"] = json.loads(config.to_json_best_effort())
  elif _WHAT.value == "matmuls":
    result = bench_matmuls(config, _STEPS.value)
    result["config"] = json.loads(config.to_json_best_effort())
  else:
    result = bench_step(config, _STEPS.value, _WARMUP.value, _PROFILE.value, _PEAK.value)
  result["processes"] = jax.process_count()
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return command.EXIT_OK


USAGE = (
  "usage: python -m train.bench [--config FILE] [--what step|matmuls|input] [--steps N] "
  "[--peak measure|given]"
)

if __name__ == "__main__":
  command.run(main, usage=USAGE, config_default="bench_r.py")
