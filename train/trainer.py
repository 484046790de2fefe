"""``train_and_evaluate(config, workdir)``: the one module that wires data, model, mesh and loop.

Read top to bottom, ``train_and_evaluate`` is the table of contents of a run: check the config,
build the mesh and the data, create or restore the born-sharded state, compile the steps, loop,
report. Importable from Colab: ``from train import trainer; trainer.train_and_evaluate(cfg, dir)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import input_pipeline
import models
from models.config import ModelConfig
from train import checkpointing, config_checks, flops, metrics, optimizer, state as state_lib, step
from train import mesh as mesh_lib
from train.meter import Meter

log = logging.getLogger("loom")


@dataclasses.dataclass
class Run:
  """Everything a run builds before its first step."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  rules: Any
  pipeline: Any
  model_cfg: ModelConfig
  tx: Any  # the optax optimizer
  spec: state_lib.StateSpec
  batch_sharding: jax.sharding.NamedSharding
  train_step: Any  # compiled
  eval_step: Any  # jitted
  meter: Meter

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Checks the config, builds mesh, data, state shapes and compiled steps (no state yet)."""
  workdir = config_checks.check_workdir(workdir)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  config_checks.check_config(config, mesh, rules, jax.process_count())

  pipeline = input_pipeline.build(config)
  model_cfg = ModelConfig.from_config(
      config.model, seq_len=config.data.seq_len, vocab_size=pipeline.tokenizer.vocab_size)
  if model_cfg.vocab_size < pipeline.tokenizer.vocab_size:
    raise ValueError(
        f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
        f"({pipeline.tokenizer.vocab_size}); use -1 or at least {pipeline.tokenizer.vocab_size}")
  if model_cfg.max_seq_len < config.data.seq_len:
    raise ValueError(
        f"model.max_seq_len={model_cfg.max_seq_len} is shorter than data.seq_len="
        f"{config.data.seq_len}; use -1 or at least {config.data.seq_len}")
  config_checks.check_model_on_mesh(model_cfg, mesh, rules)
  steps = build_steps(config, mesh, rules, model_cfg)
  return Run(config, workdir, mesh, rules, pipeline, model_cfg, *steps)


def build_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules,
                model_cfg: ModelConfig) -> tuple:
  """Optimizer, state shapes and shardings, the compiled train step, the eval step and the meter.

  Shared by the trainer and the benchmark so that both measure the very same program.
  """
  tx = optimizer.make_optimizer(config.optim, config.train.steps)
  schedule = optimizer.learning_rate_schedule(config.optim, config.train.steps)
  spec = state_lib.state_spec(model_cfg, tx, mesh, rules, seed=config.seed)
  config_checks.check_divisible_shardings(spec.abstract, mesh)

  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  batch_shape = (config.train.batch_size, config.data.seq_len)
  abstract_batch = {
      key: jax.ShapeDtypeStruct(batch_shape, dtype, sharding=batch_sharding)
      for key, dtype in (("inputs", jnp.int32), ("targets", jnp.int32), ("positions", jnp.int32),
                         ("segment_ids", jnp.int32), ("weights", jnp.float32))
  }
  replicated = mesh_lib.replicated(mesh)
  peak = flops.measure_matmul_peak(dtype=jnp.dtype(model_cfg.dtype))
  if jax.devices()[0].platform != "cpu":
    peak *= jax.device_count()  # CPU "devices" share one machine: its peak is counted once
  meter = Meter(flops_per_token=flops.train_flops_per_token(model_cfg, config.data.seq_len),
                peak_flops_per_second=peak)

  train_fn = jax.jit(
      functools.partial(step.train_step, graphdef=spec.graphdef, tx=tx, schedule=schedule,
                        microbatches=config.train.microbatches),
      in_shardings=(spec.shardings, batch_sharding),
      out_shardings=(spec.shardings, replicated),
      donate_argnums=0,
  )
  eval_fn = jax.jit(
      functools.partial(step.eval_step, graphdef=spec.graphdef),
      in_shardings=(spec.shardings["params"], batch_sharding),
      out_shardings=replicated,
  )
  with meter.phase("compile"), jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    compiled = train_fn.lower(spec.abstract, abstract_batch).compile()
  return tx, spec, batch_sharding, compiled, eval_fn, meter


def run_metadata(run: Run) -> dict[str, Any]:
  return {
      "config": json.loads(run.config.to_json_best_effort()),
      "data_fingerprint": run.pipeline.fingerprint,
      "model_config": run.model_cfg.to_dict(),
  }


def restore_or_init(run: Run, ckpt: checkpointing.Checkpointer) -> tuple[Any, int]:
  """The latest complete checkpoint of this workdir, or a freshly initialised state."""
  latest = ckpt.latest_step()
  if latest is None:
    state = state_lib.init_state(run.spec, run.model_cfg, run.tx, run.mesh, run.rules,
                                 run.config.seed)
    return state, 0
  problems = checkpointing.check_compatible(
      ckpt.metadata(latest), run_metadata(run), path=ckpt.directory,
      allow_mismatch=run.config.checkpoint.allow_mismatch)
  for problem in problems:
    log.warning("resuming despite a mismatch (checkpoint.allow_mismatch): %s", problem)
  with run.meter.phase("checkpoint"):
    state = ckpt.restore(latest, run.spec.abstract)
  log.info("resumed from %s at step %d", ckpt.directory, latest)
  return state, latest


def evaluate(run: Run, params, eval_batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Loss, perplexity and bits per byte over the fixed validation batches."""
  totals = [run.eval_step(params, batch) for batch in eval_batches]
  loss_sum = sum(float(t["loss_sum"]) for t in totals)
  tokens = sum(float(t["tokens"]) for t in totals)
  loss = loss_sum / max(tokens, 1.0)
  bits_per_byte = loss / math.log(2) / run.pipeline.bytes_per_token
  return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)),
          "eval/bits_per_byte": bits_per_byte}


def log_startup(run: Run, start_step: int) -> None:
  config = run.config
  params = models.param_count(run.model_cfg)
  batch = config.train.batch_size
  lines = [
      f"processes: {jax.process_count()} (this is {jax.process_index()}); devices: "
      f"{jax.local_device_count()} local, {jax.device_count()} global "
      f"({jax.devices()[0].device_kind}, {jax.devices()[0].platform})",
      f"mesh: {mesh_lib.describe(run.mesh)}",
      f"model: {params:,} params ({models.param_count(run.model_cfg, embeddings=False):,} "
      f"without embeddings); {run.meter.flops_per_token:,} train FLOPs/token",
      f"batch: global {batch} × {config.data.seq_len} tokens; per process "
      f"{batch // jax.process_count()}; per device {batch // run.batch_sharding.num_devices}"
      f"{'' if config.train.microbatches == 1 else f' in {config.train.microbatches} micro-batches'}",
      f"data: {config.data.source} ({config.data.tokenizer} tokenizer), fingerprint "
      f"{run.pipeline.fingerprint[:16]}",
      f"peak: {run.meter.peak_flops_per_second / 1e9:,.0f} GFLOP/s (matmul, measured); compile "
      f"{run.meter.seconds['compile']:.1f}s",
      f"steps: {start_step} -> {config.train.steps}; workdir {run.workdir}",
  ]
  for line in lines:
    log.info(line)


def _due(step_number: int, every: int, last: int) -> bool:
  return step_number == last or (every > 0 and step_number % every == 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming if ``workdir`` has a checkpoint), evaluates, checkpoints, reports."""
  run = setup(config, workdir)
  if run.is_main:
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpointing.Checkpointer(
      os.path.join(run.workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
      async_save=config.checkpoint.async_save)
  state, start_step = restore_or_init(run, ckpt)
  log_startup(run, start_step)
  writer = metrics.MetricsWriter(run.workdir, resume_step=start_step,
                                 tensorboard=config.log.tensorboard, enabled=run.is_main)
  try:
    state, summary = train_loop(run, state, start_step, ckpt, writer)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  report = run.meter.report(
      params=models.param_count(run.model_cfg),
      params_nonembedding=models.param_count(run.model_cfg, embeddings=False),
      devices=jax.devices(), pue=config.meter.pue, grid_kg_per_kwh=config.meter.grid_kg_per_kwh,
      power_override=config.meter.power_watts)
  report.update(summary)
  if run.is_main:
    with open(os.path.join(run.workdir, "report.json"), "w") as f:
      json.dump(report, f, indent=2)
    log.info("done: %s", ", ".join(f"{k} {v:.4g}" for k, v in summary.items()
                                   if isinstance(v, float)))
    log.info("meter: %.3g FLOPs in %.1fs, mean MFU %s, %.2g kWh (estimated), %.2g kg CO2e",
             report["total_flops"], report["wall_time_s"],
             f"{report['mfu_mean']:.1%}" if report["mfu_mean"] is not None else "n/a",
             report["energy_kwh"], report["co2e_kg"])
  return report


def train_loop(run: Run, state, start_step: int, ckpt: checkpointing.Checkpointer,
               writer: metrics.MetricsWriter) -> tuple[Any, dict[str, float]]:
  """Dispatches step N+1 before fetching step N's metrics; evals and saves on schedule."""
  config, meter = run.config, run.meter
  total = config.train.steps
  tokens_per_step = config.train.batch_size * config.data.seq_len
  process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
  batches = run.pipeline.train_batches(
      global_batch_size=config.train.batch_size, start_step=start_step, **process)
  eval_batches = [
      input_pipeline.to_global(batch, run.batch_sharding)
      for batch in run.pipeline.eval_batches(
          global_batch_size=config.train.batch_size, num_batches=config.train.eval_batches,
          **process)
  ]
  # XLA:CPU collectives can deadlock with many multi-device steps in flight (NOTES.md): there,
  # bound the steps in flight to one. Everywhere else dispatch stays fully asynchronous.
  block_each_step = jax.devices()[0].platform == "cpu" and jax.device_count() > 1
  progress = metrics.Progress(total, start_step, enabled=run.is_main and config.log.progress)
  summary: dict[str, float] = {}
  pending = None  # (step number, metrics on device) awaiting a fetch
  window_start, window_steps = time.perf_counter(), 0

  def fetch(step_number: int, device_metrics) -> None:
    nonlocal window_start, window_steps
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not math.isfinite(values["train/loss"]):
      raise FloatingPointError(
          f"train/loss is {values['train/loss']} at step {step_number} (grad norm "
          f"{values['train/grad_norm']}); lower optim.learning_rate or check the data")
    now = time.perf_counter()
    tokens_per_second, mfu = meter.record_window(window_steps * tokens_per_step, now - window_start)
    window_start, window_steps = now, 0
    values.update({"perf/tokens_per_second": tokens_per_second, "perf/mfu": mfu})
    writer.write(step_number, values)
    progress.update(step_number, values["train/loss"], tokens_per_second, mfu)
    summary["train/loss"] = values["train/loss"]

  for step_index in range(start_step, total):
    step_number = step_index + 1  # the state's step after this update
    with meter.phase("input_wait"):
      batch = input_pipeline.to_global(next(batches), run.batch_sharding)
    with meter.phase("train"):
      state, step_metrics = run.train_step(state, batch)
      if block_each_step:
        step_metrics["train/loss"].block_until_ready()
      if pending is not None:
        fetch(*pending)
        pending = None
    meter.tokens += tokens_per_step
    window_steps += 1
    if _due(step_number, config.log.every, total):
      pending = (step_number, step_metrics)
    if _due(step_number, config.train.eval_every, total):
      if pending is not None:
        fetch(*pending)
        pending = None
      with meter.phase("eval"):
        eval_metrics = evaluate(run, state["params"], eval_batches)
      writer.write(step_number, eval_metrics)
      summary.update(eval_metrics)
      if run.is_main:
        log.info("eval at step %d: %s", step_number,
                 ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
      window_start = time.perf_counter()  # eval time is not train throughput
    if _due(step_number, config.checkpoint.every, total):
      with meter.phase("checkpoint"):
        ckpt.save(step_number, state, run_metadata(run))
  if pending is not None:
    with meter.phase("train"):
      fetch(*pending)
  summary["steps"] = float(total)
  return state, summary
