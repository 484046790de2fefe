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
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

import models
from input_pipeline import preparation
from input_pipeline.device import row_share
from input_pipeline.host import agreement, settings, storage
from models import attention
from models import pipeline as pipeline_parallel
from models.config import ModelConfig
from train import config as config_lib
from train import faults, init_from, loop, metrics_writer
from train import state as state_lib
from train.checkpoint import local_files, local_tier
from train.checkpoint import manager as checkpoint_lib
from train.cluster import mesh as mesh_lib
from train.cluster.preemption import PreemptionWatcher
from train.meter import energy, flops
from train.meter import run_meter as meter_lib
from train.meter.run_meter import Meter
from train.programs import Programs, jit_programs, uses_reference

log = logging.getLogger("loom")


@dataclasses.dataclass
class Compiled:
  """The jitted programs of a run, its train step compiled for the local devices, and its meter."""

  programs: Programs
  compiled_step: Any  # programs.train_step compiled: (state, batch) -> (state, metrics), donated
  meter: Meter


@dataclasses.dataclass
class Run:
  """Everything a run builds before its first step."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  rules: Any
  pipeline: Any
  model_cfg: ModelConfig
  programs: Programs
  compiled_step: Any  # programs.train_step compiled for this mesh's devices
  meter: Meter

  @property
  def is_main(self) -> bool:
    return jax.process_index() == 0

  @property
  def spec(self) -> state_lib.StateSpec:
    return self.programs.spec

  @property
  def tx(self) -> Any:
    return self.programs.tx

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return self.programs.batch_sharding

  @property
  def eval_step(self) -> Any:
    return self.programs.eval_step

  @property
  def data_share(self) -> dict[str, int]:
    """The pipeline's ``process_index`` and ``process_count`` for this process: its block of
    each batch's rows (``input_pipeline.row_share``; processes of one block read the same rows)."""
    index, count = row_share(self.batch_sharding)
    return {"process_index": index, "process_count": count}

  def train_batches(self, position: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's batches from data position ``position`` (0-based: step + data offset) on,
    with the ``debug`` group's injected faults (``train/faults.py``)."""
    batches = self.pipeline.train_batches(
      global_batch_size=self.config.train.batch_size, start_step=position, **self.data_share
    )
    batches = faults.inject(
      batches, self.config.debug, first_position=position + 1, vocab_size=self.model_cfg.vocab_size
    )
    return self.checked(batches)

  def checked(self, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The batches, each first checked to fit the compiled attention (cuDNN's bound on the
    documents per packed row, ``model.max_segments``): a fuller row stops the run, named."""
    cfg = self.model_cfg
    seq_len = self.config.data.seq_len
    if (
      attention.implementation(cfg.attention, cfg.dtype, seq_len, head_dim=cfg.head_dim) != "cudnn"
    ):
      yield from batches
      return
    for batch in batches:
      try:
        attention.check_runs(batch["segment_ids"], cfg.max_segments)
      except ValueError as e:
        raise config_lib.ConfigError(str(e)) from e
      yield batch


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates the config, then builds the data, the state shapes and the compiled steps."""
  # The meter's wall time and measured energy start here: data preparation included.
  started, span = time.perf_counter(), energy.EnergySpan.start()
  config = init_from.adopt(config)  # the source's architecture, when starting from weights
  if config.train.objective == "grpo":  # its batches are rollouts, not a data pipeline's
    raise config_lib.ConfigError(
      "train.objective='grpo' trains on its own samples: run it with python -m train.rl"
    )
  resolved = config_lib.validate(config, workdir=workdir)
  workdir = config_lib.create_workdir(workdir)
  data_started = time.perf_counter()
  pipeline = preparation.build(config)  # prepared once for every process
  data_s = time.perf_counter() - data_started
  if pipeline.tokenizer.vocab_size > resolved.model_cfg.vocab_size:
    raise RuntimeError(  # validation predicted the vocabulary from the config: a bug if it differs
      f"the tokenizer has {pipeline.tokenizer.vocab_size} ids, more than the model's "
      f"vocab_size={resolved.model_cfg.vocab_size} resolved from the config"
    )
  compiled = build_steps(config, resolved.mesh, resolved.rules, resolved.model_cfg)
  compiled.meter.started, compiled.meter.energy_span = started, span
  compiled.meter.seconds["data"] += data_s  # preparing (or opening) the run's data store
  return Run(
    config=config,
    workdir=workdir,
    mesh=resolved.mesh,
    rules=resolved.rules,
    pipeline=pipeline,
    model_cfg=resolved.model_cfg,
    programs=compiled.programs,
    compiled_step=compiled.compiled_step,
    meter=compiled.meter,
  )


def build_steps(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  rules,
  model_cfg: ModelConfig,
  *,
  measure_peak: bool = False,
) -> Compiled:
  """The jitted programs, the train step compiled for the local devices, and the meter.

  Shared by the trainer and the benchmark so that both measure the very same program. The
  benchmark measures the CPU peak (``measure_peak``) even where ``LOOM_CPU_PEAK_FLOPS`` gives one,
  unless told ``--peak=given``.
  """
  programs = jit_programs(config, mesh, rules, model_cfg)
  peak = flops.run_peak(model_cfg.dtype, use_given=not measure_peak)
  per_token = flops.train_flops_per_token(model_cfg, config.data.seq_len)
  if uses_reference(config):  # the reference model's forward pass, every step
    per_token += flops.forward_flops_per_token(model_cfg, config.data.seq_len)
  meter = Meter(
    flops_per_token=per_token,
    peak_flops_per_second=peak.flops_per_second,
    peak_source=peak.source,
  )
  with meter.phase("compile"):
    compiled_step = programs.compile_train_step()
  return Compiled(programs, compiled_step, meter)


def run_metadata(run: Run) -> dict[str, Any]:
  return {
    "config": json.loads(run.config.to_json_best_effort()),
    "data_fingerprint": run.pipeline.fingerprint,
    "model_config": run.model_cfg.to_dict(),
    "state_items": sorted(run.spec.abstract),  # a DPO or GRPO run's "reference" among them
  }


def open_checkpoints(run: Run, watcher: PreemptionWatcher, *, local: bool = True):
  """The run's checkpoints: the persistent tier under ``WORKDIR/checkpoints`` and, with
  ``checkpoint.local_dir`` (and ``local``), the local tier beside it."""
  config = run.config.checkpoint
  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(run.workdir, "checkpoints"),
    max_to_keep=config.max_to_keep,
    async_save=config.async_save,
    compress=config.compress,
    save_timeout_s=config.save_timeout_s,
    save_retries=config.save_retries,
    stop_requested=watcher.noticed,
  )
  if config.local_dir and not local:
    log.warning("checkpoint.local_dir is not used by this command: persistent checkpoints only")
  elif config.local_dir:
    ckpt.local = local_tier.LocalTier(
      config.local_dir,
      local_tier.run_id(run.workdir),
      id_file=local_tier.id_file(run.workdir),
      every=config.local_every,
      keep=config.local_keep,
      replicas=config.local_replicas,
      signature=local_files.layout_signature(run.spec.abstract),
      timeout_s=config.save_timeout_s,
      stop_requested=watcher.noticed,
    )
    if run.config.debug.kill_at_step:
      faults.kill_after(ckpt, run.config.debug.kill_at_step)
  return ckpt


def restore_or_init(run: Run, ckpt: checkpoint_lib.Checkpointer) -> tuple[Any, int]:
  """The newest good checkpoint of this workdir in either tier, or a freshly initialised state."""

  def check_metadata(saved: dict[str, Any]) -> None:
    if saved.get("kind") == "params":
      raise checkpoint_lib.CheckpointMismatchError(
        f"{ckpt.directory} holds imported weights (parameters only, no optimizer state): train "
        f"from them in a new work directory with --config.checkpoint.init_from=loom:"
        f"{run.workdir}"
      )
    problems = checkpoint_lib.check_compatible(
      saved,
      run_metadata(run),
      path=ckpt.directory,
      allow_mismatch=run.config.checkpoint.allow_mismatch,
    )
    for problem in problems:
      log.warning("resuming despite a mismatch (checkpoint.allow_mismatch): %s", problem)
    before = (saved.get("config") or {}).get("train", {}).get("steps")
    optim = run.config.optim
    if before not in (None, run.config.train.steps) and optim.schedule != "constant":
      log.warning(
        "train.steps=%s in the checkpoint, %d now: the learning rate (optim.schedule=%r) decays "
        "over the new count, so it changes where the run resumes; give optim.schedule='constant' "
        "or keep train.steps for the old schedule",
        before,
        run.config.train.steps,
        optim.schedule,
      )

  if ckpt.local is not None:
    with run.meter.phase("checkpoint"):
      persistent = ckpt.all_steps()
      newest = agreement.from_main("persistent-latest", str(max(persistent, default=-1)))
      restored = ckpt.local.restore_newest(
        run.spec.abstract, newer_than=int(newest), check_metadata=check_metadata
      )
    if restored is not None:
      step, state, how = restored
      ckpt.restored_from = {"tier": "local", "step": step, **how}
      log.info(
        "resumed from the local tier (%s) at step %d%s",
        ckpt.local.root,
        step,
        f"; the shards of processes {how['from_peers']} from their peers' replicas"
        if how["from_peers"]
        else "",
      )
      return state, step
  with run.meter.phase("checkpoint"):
    restored = ckpt.restore_latest_good(
      run.spec.abstract,
      verify_checksums=run.config.checkpoint.verify,
      check_metadata=check_metadata,
    )
  if restored is None and run.config.checkpoint.init_from:
    with run.meter.phase("checkpoint"):
      params = init_from.load_params(run.config, run.spec, run.model_cfg, run.mesh, run.rules)
    log.info("initialised the parameters from %s", run.config.checkpoint.init_from)
    if run.model_cfg.lora_rank > 0:  # the adapters start fresh: A random, B zero
      initial = state_lib.init_state(
        run.spec, run.model_cfg, run.tx, run.mesh, run.rules, run.config.seed
      )["params"]
      params = init_from.with_fresh_adapters(params, initial)
    return state_lib.state_from_params(run.spec, run.tx, params), 0
  if restored is None:
    state = state_lib.init_state(
      run.spec, run.model_cfg, run.tx, run.mesh, run.rules, run.config.seed
    )
    return state, 0
  step, state = restored
  ckpt.restored_from = {"tier": "persistent", "step": step}
  log.info("resumed from %s at step %d", ckpt.directory, step)
  return state, step


def pipeline_schedule(run: Run) -> dict[str, float | int]:
  """The pipeline's stages, microbatches, repeats, ticks and bubble (1 stage: no pipeline)."""
  stages = mesh_lib.ways(run.mesh, run.rules, "layers")[0]
  cfg = run.model_cfg
  return pipeline_parallel.schedule(stages, cfg.pipeline_microbatches, cfg.pipeline_repeats)


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
    f"without embeddings"
    + (
      f"; {models.param_count(run.model_cfg, active=True):,} active per token"
      if run.model_cfg.moe
      else ""
    )
    + f"); {run.meter.flops_per_token:,} train FLOPs/token",
    f"batch: global {batch} × {config.data.seq_len} tokens; per process "
    f"{batch // run.data_share['process_count']}; per data-parallel shard "
    f"{batch // mesh_lib.data_parallel_size(run.mesh, run.rules)}; micro-batches "
    f"{config.train.microbatches}",
    f"data: {_data_source(config)} ({config.data.tokenizer} tokenizer), fingerprint "
    f"{run.pipeline.fingerprint[:16]}",
    f"peak: {run.meter.peak_flops_per_second / 1e9:,.0f} GFLOP/s ({run.meter.peak_source}); "
    f"compile {run.meter.seconds['compile']:.1f}s",
    f"steps: {start_step} -> {config.train.steps}; workdir {run.workdir}",
  ]
  schedule = pipeline_schedule(run)
  if schedule["stages"] > 1:
    lines.append(
      "pipeline: {stages} stages, {microbatches} microbatches, {repeats} repeats "
      "({ticks} ticks per forward pass, bubble {bubble:.1%})".format(**schedule)
    )
  for line in lines:
    log.info(line)


def _data_source(config: ml_collections.ConfigDict) -> str:
  """What feeds the run: ``data.source``, or a GRPO run's prompt files (train/rl/loop.py)."""
  if config.train.objective != "grpo":
    return config.data.source
  held_out = f", held out {config.rl.eval_prompts}" if config.rl.eval_prompts else ""
  return f"prompts {config.rl.prompts}{held_out}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming if ``workdir`` has a checkpoint), evaluates, checkpoints, reports.

  Returns the report (also written to ``WORKDIR/report.json``); ``report["preempted"]`` says
  whether the run stopped early on SIGTERM/SIGINT after saving a checkpoint. The library entry:
  it applies Loom's process settings first (as every command does), which reach XLA if JAX has
  not computed anything yet in this process.
  """
  settings.apply()
  run = setup(config, workdir)
  watcher = PreemptionWatcher()
  ckpt = open_checkpoints(run, watcher)
  try:
    with run.meter.phase("restore_or_init"):  # checksum verification included
      state, start_step = restore_or_init(run, ckpt)  # may refuse a checkpoint of another run
      if ckpt.local is not None:
        ckpt.local.discard_after(start_step)  # local steps past it are saved again
    finished = already_finished(run, start_step)
    if run.is_main and not finished:
      storage.write_atomic(
        storage.absolute(run.workdir) / "config.json", run.config.to_json_best_effort(indent=2)
      )
    log_startup(run, start_step)
    writer = metrics_writer.MetricsWriter(
      run.workdir,
      resume_step=start_step,
      tensorboard=config.log.tensorboard,
      enabled=run.is_main,
      wandb_project=config.log.wandb_project,
      config=json.loads(run.config.to_json_best_effort()),
    )
    try:
      summary = loop.train_loop(run, state, start_step, ckpt, writer, watcher, run_metadata(run))
      # Steps a crash ran past the checkpoint this attempt resumed from (seen in metrics.jsonl):
      # this attempt ran them again.
      summary["redone_steps_after_restart"] = max(writer.last_logged_step - start_step, 0)
      summary["restarted_from_step"] = start_step
    except BaseException:
      writer.finish(None)  # the W&B run is marked failed; metrics.jsonl keeps every line
      ckpt.wait_on_error()
      raise
    else:
      with run.meter.phase("checkpoint"):
        ckpt.wait(last=True)
    finally:
      writer.close()
  finally:
    ckpt.close()
    watcher.close()
  if ckpt.local is not None and not summary["preempted"]:
    ckpt.local.release()  # finished: the persistent tier holds its last step
  # Hashing the checkpoints ran on the sealing thread, beside the steps (not in "checkpoint").
  summary["checkpoint_seal_s"] = round(ckpt.seal_seconds, 3)
  summary["checkpoint_retried_saves"] = ckpt.retried_saves
  summary["restored_from"] = ckpt.restored_from
  summary["pipeline"] = pipeline_schedule(run)
  if ckpt.local is not None:
    stats = ckpt.local.stats
    summary["local_tier"] = {
      k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()
    }
    summary["local_tier"]["enabled"] = ckpt.local.enabled
  report = write_report(run, summary, keep_written=finished)
  writer.finish(report)
  return report


def already_finished(run: Run, start_step: int) -> bool:
  """Whether the restored checkpoint is the run's last step: a start that trains nothing leaves
  the run's config.json and its final report.json (its meter) as the run wrote them."""
  finished = start_step >= run.config.train.steps > 0
  if finished:
    log.info(
      "%s finished at step %d already: nothing to train (raise train.steps to train on); its "
      "config.json and final report.json are kept",
      run.workdir,
      start_step,
    )
  return finished


def _final_report(path) -> bool:
  try:
    return json.loads(path.read_text()).get("preempted") is False
  except (OSError, ValueError, AttributeError):  # none, torn or not a report: write it
    return False


def write_report(
  run: Run, summary: dict[str, Any], *, keep_written: bool = False
) -> dict[str, Any]:
  """The run's report; written to ``report.json`` unless ``keep_written`` and the one there is a
  final report (an attempt that was not preempted: one that was covers part of the run)."""
  config = run.config
  report = run.meter.report(
    params=models.param_count(run.model_cfg),
    params_nonembedding=models.param_count(run.model_cfg, embeddings=False),
    params_active=models.param_count(run.model_cfg, active=True),
    devices=jax.devices(),
    pue=config.meter.pue,
    grid_kg_per_kwh=config.meter.grid_kg_per_kwh,
    power_override=config.meter.power_watts,
  )
  report.update(summary)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  report["goodput"] = meter_lib.goodput(report, tokens_per_step)
  path = storage.absolute(run.workdir) / "report.json"
  if run.is_main and not (keep_written and _final_report(path)):
    storage.write_atomic(path, json.dumps(report, indent=2))
    log.info(
      "done: %s", ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if isinstance(v, float))
    )
    for line in meter_lib.summary_lines(report):
      log.info(line)
  return report
