"""``train_and_evaluate(config, workdir)``: the one module that wires data, model, mesh and loop.

Read top to bottom, ``train_and_evaluate`` is the table of contents of a run: check the config,
build the mesh and the data, create or restore the born-sharded state, compile the steps, loop,
report. Importable from Colab: ``from train import trainer; trainer.train_and_evaluate(cfg, dir)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import input_pipeline
import models
from models.config import ModelConfig
from train import checkpointing, config_checks, flops, loop, metrics
from train import mesh as mesh_lib
from train import meter as meter_lib
from train import state as state_lib
from train.meter import Meter
from train.preemption import PreemptionWatcher
from train.programs import jit_programs

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
    config.model, seq_len=config.data.seq_len, vocab_size=pipeline.tokenizer.vocab_size
  )
  if model_cfg.vocab_size < pipeline.tokenizer.vocab_size:
    raise ValueError(
      f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
      f"({pipeline.tokenizer.vocab_size}); use -1 or at least {pipeline.tokenizer.vocab_size}"
    )
  if model_cfg.max_seq_len < config.data.seq_len:
    raise ValueError(
      f"model.max_seq_len={model_cfg.max_seq_len} is shorter than data.seq_len="
      f"{config.data.seq_len}; use -1 or at least {config.data.seq_len}"
    )
  config_checks.check_model_on_mesh(model_cfg, mesh, rules)
  steps = build_steps(config, mesh, rules, model_cfg)
  return Run(config, workdir, mesh, rules, pipeline, model_cfg, *steps)


def build_steps(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules, model_cfg: ModelConfig
) -> tuple:
  """Optimizer, state shapes and shardings, the compiled train step, the eval step and the meter.

  Shared by the trainer and the benchmark so that both measure the very same program.
  """
  programs = jit_programs(config, mesh, rules, model_cfg)
  # A quick measurement for the MFU column of the logs; train.bench measures longer.
  peak = flops.measure_matmul_peak(dtype=jnp.dtype(model_cfg.dtype), repeats=5)
  # Fake CPU devices share their machine's cores: count each process's machine once. (Several
  # processes on one machine, as in the tests, then over-count the peak and under-state MFU.)
  peak *= jax.process_count() if jax.devices()[0].platform == "cpu" else jax.device_count()
  meter = Meter(
    flops_per_token=flops.train_flops_per_token(model_cfg, config.data.seq_len),
    peak_flops_per_second=peak,
  )
  with meter.phase("compile"), jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    compiled = programs.train_step.lower(programs.spec.abstract, programs.abstract_batch).compile()
  return programs.tx, programs.spec, programs.batch_sharding, compiled, programs.eval_step, meter


def run_metadata(run: Run) -> dict[str, Any]:
  return {
    "config": json.loads(run.config.to_json_best_effort()),
    "data_fingerprint": run.pipeline.fingerprint,
    "model_config": run.model_cfg.to_dict(),
  }


def restore_or_init(run: Run, ckpt: checkpointing.Checkpointer) -> tuple[Any, int]:
  """The newest good checkpoint of this workdir, or a freshly initialised state."""

  def check_metadata(saved: dict[str, Any]) -> None:
    problems = checkpointing.check_compatible(
      saved,
      run_metadata(run),
      path=ckpt.directory,
      allow_mismatch=run.config.checkpoint.allow_mismatch,
    )
    for problem in problems:
      log.warning("resuming despite a mismatch (checkpoint.allow_mismatch): %s", problem)

  with run.meter.phase("checkpoint"):
    restored = ckpt.restore_latest_good(
      run.spec.abstract,
      verify_checksums=run.config.checkpoint.verify,
      check_metadata=check_metadata,
    )
  if restored is None:
    state = state_lib.init_state(
      run.spec, run.model_cfg, run.tx, run.mesh, run.rules, run.config.seed
    )
    return state, 0
  step, state = restored
  log.info("resumed from %s at step %d", ckpt.directory, step)
  return state, step


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
    f"{batch // jax.process_count()}; per data-parallel shard "
    f"{batch // mesh_lib.data_parallel_size(run.mesh, run.rules)}; micro-batches "
    f"{config.train.microbatches}",
    f"data: {config.data.source} ({config.data.tokenizer} tokenizer), fingerprint "
    f"{run.pipeline.fingerprint[:16]}",
    f"peak: {run.meter.peak_flops_per_second / 1e9:,.0f} GFLOP/s (matmul, measured); compile "
    f"{run.meter.seconds['compile']:.1f}s",
    f"steps: {start_step} -> {config.train.steps}; workdir {run.workdir}",
  ]
  for line in lines:
    log.info(line)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming if ``workdir`` has a checkpoint), evaluates, checkpoints, reports.

  Returns the report (also written to ``WORKDIR/report.json``); ``report["preempted"]`` says
  whether the run stopped early on SIGTERM/SIGINT after saving a checkpoint.
  """
  run = setup(config, workdir)
  if run.is_main:
    with open(os.path.join(run.workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpointing.Checkpointer(
    os.path.join(run.workdir, "checkpoints"),
    max_to_keep=config.checkpoint.max_to_keep,
    async_save=config.checkpoint.async_save,
  )
  watcher = PreemptionWatcher()
  try:
    state, start_step = restore_or_init(run, ckpt)
    log_startup(run, start_step)
    writer = metrics.MetricsWriter(
      run.workdir, resume_step=start_step, tensorboard=config.log.tensorboard, enabled=run.is_main
    )
    try:
      summary = loop.train_loop(run, state, start_step, ckpt, writer, watcher, run_metadata(run))
    finally:
      with run.meter.phase("checkpoint"):
        ckpt.wait()
      writer.close()
  finally:
    ckpt.close()
    watcher.close()
  return write_report(run, summary)


def write_report(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
  config = run.config
  report = run.meter.report(
    params=models.param_count(run.model_cfg),
    params_nonembedding=models.param_count(run.model_cfg, embeddings=False),
    devices=jax.devices(),
    pue=config.meter.pue,
    grid_kg_per_kwh=config.meter.grid_kg_per_kwh,
    power_override=config.meter.power_watts,
  )
  report.update(summary)
  if run.is_main:
    with open(os.path.join(run.workdir, "report.json"), "w") as f:
      json.dump(report, f, indent=2)
    log.info(
      "done: %s", ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))
    )
    for line in meter_lib.summary_lines(report):
      log.info(line)
  return report
