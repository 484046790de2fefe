"""The training loop: dispatch ahead, fetch on log steps, eval, checkpoint, survive failures.

The host never waits for the device between log steps: a step's metrics stay on the device
unless it is a log step, whose metrics are fetched once RUN_AHEAD more steps are queued behind
it, and skipped steps are recorded on the device (``step.track_health``) and read with them.

Called by ``trainer.train_and_evaluate`` with everything built; it owns no set-up of its own.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import time
from typing import Any

import jax
import numpy as np

import input_pipeline
from train import metrics_writer, profiling
from train import step as step_lib
from train.checkpoint.manager import Checkpointer
from train.inference import generation

log = logging.getLogger("loom")

RUN_AHEAD = 2  # steps dispatched after a log step before its metrics are fetched
RECORD_FIELDS = ("step", "spike", "loss", "grad_norm", "in_a_row")  # step.track_health's ring


class DivergenceError(RuntimeError):
  """The run kept producing non-finite or spiking losses; continuing would waste the job."""


def _due(step_number: int, every: int, last: int) -> bool:
  return step_number == last or (every > 0 and step_number % every == 0)


def evaluate(run, params, eval_batches: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Loss, perplexity and bits per byte over the fixed validation batches."""
  totals = [run.eval_step(params, batch) for batch in eval_batches]
  loss_sum = sum(float(t["loss_sum"]) for t in totals)
  tokens = sum(float(t["tokens"]) for t in totals)
  loss = loss_sum / max(tokens, 1.0)
  return {
    "eval/loss": loss,
    "eval/perplexity": math.exp(min(loss, 50.0)),
    "eval/bits_per_byte": loss / math.log(2) / run.pipeline.bytes_per_token,
  }


def _poison(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """debug.nan_steps: NaN loss weights make this step's loss and gradients NaN."""
  return dict(batch, weights=np.full_like(batch["weights"], np.nan))


def _spike(batch: dict[str, np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
  """debug.spike_steps: every target becomes an id the model has learned never to predict."""
  return dict(batch, targets=np.full_like(batch["targets"], vocab_size - 1))


class _Loop:
  """The state of one pass of the loop (kept together so each part reads as a short method)."""

  def __init__(
    self,
    run,
    state,
    start_step: int,
    ckpt: Checkpointer,
    writer: metrics_writer.MetricsWriter,
    watcher,
    metadata: dict[str, Any],
  ):
    self.run, self.config, self.meter = run, run.config, run.meter
    self.metadata = metadata  # saved with every checkpoint
    self.state, self.step_index = state, start_step
    self.ckpt, self.writer, self.watcher = ckpt, writer, watcher
    self.total = self.config.train.steps
    self.tokens_per_step = self.config.train.batch_size * self.config.data.seq_len
    self.process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    self.nan_steps = set(self.config.debug.nan_steps)
    self.spike_steps = set(self.config.debug.spike_steps)
    # XLA:CPU collectives can deadlock with many multi-device steps in flight (NOTES.md): there,
    # bound the steps in flight to one. Everywhere else dispatch stays fully asynchronous.
    self.block_each_step = jax.devices()[0].platform == "cpu" and jax.device_count() > 1
    self.progress = metrics_writer.Progress(
      self.total, start_step, enabled=run.is_main and self.config.log.progress
    )
    self.summary: dict[str, Any] = {"preempted": False, "rollbacks": 0, "redone_steps": 0}
    self.rolled_back = False
    # Log steps' (step number, metrics, health) on the device, awaiting a fetch; and the latest
    # step's, for the summary at the end.
    self.pending: collections.deque = collections.deque()
    self.latest = None
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    self.new_health = jax.jit(step_lib.init_health, out_shardings=replicated)
    self.track_health = jax.jit(step_lib.track_health)  # not donated: log steps keep theirs
    self.health, self.skips_seen = self.new_health(), 0
    self.window_start, self.window_steps = time.perf_counter(), 0
    window = tuple(self.config.log.profile_steps) or (None, None)
    self.profiler = profiling.StepProfiler(os.path.join(run.workdir, "profile"), *window)
    self.open_batches()
    self.eval_batches = [
      input_pipeline.to_global(batch, run.batch_sharding)
      for batch in run.pipeline.eval_batches(
        global_batch_size=self.config.train.batch_size,
        num_batches=self.config.train.eval_batches,
        **self.process,
      )
    ]

  def open_batches(self) -> None:
    """Batches from data position (step + data offset): O(1) to reopen anywhere."""
    self.data_offset = int(jax.device_get(self.state["data_offset"]))
    self.batches = self.run.pipeline.train_batches(
      global_batch_size=self.config.train.batch_size,
      start_step=self.step_index + self.data_offset,
      **self.process,
    )

  def run_all(self) -> dict[str, Any]:
    while self.step_index < self.total:
      self.rolled_back = False
      step_number = self.step_index + 1  # the state's step after this update
      self.dispatch(step_number)
      eval_due = _due(step_number, self.config.train.eval_every, self.total)
      stop = self.watcher.should_stop(step_number)
      save_due = stop or _due(step_number, self.config.checkpoint.every, self.total)
      if eval_due or save_due:
        self.flush()  # the health checks of the last step come before evals and saves
      if self.rolled_back:
        continue  # the state and the data position now come from the checkpoint
      self.step_index = step_number
      if eval_due:
        self.evaluate(step_number)
      if save_due:
        with self.meter.phase("checkpoint"):
          self.writer.flush()  # every line up to this checkpoint is durable before it exists
          self.ckpt.save(step_number, self.state, self.metadata)
      if stop:
        with self.meter.phase("checkpoint"):
          self.ckpt.wait()
        log.warning(
          "stopped by %s at step %d; checkpoint saved in %s",
          self.watcher.reason,
          step_number,
          self.ckpt.directory,
        )
        self.summary["preempted"] = True
        break
    self.flush()
    self.profiler.close(self.state)  # a run that stopped inside the traced steps
    self.summary["steps"] = float(self.step_index)
    return self.summary

  def dispatch(self, step_number: int) -> None:
    with self.meter.phase("input_wait"):
      host_batch = next(self.batches)
      # Fault injection follows the data (as bad data would), not the step counter.
      position = step_number + self.data_offset
      if position in self.nan_steps:
        host_batch = _poison(host_batch)
      if position in self.spike_steps:
        host_batch = _spike(host_batch, self.run.model_cfg.vocab_size)
      batch = input_pipeline.to_global(host_batch, self.run.batch_sharding)
    with self.meter.phase("train"), self.profiler.step(step_number, lambda: self.state):
      self.state, step_metrics = self.run.train_step(self.state, batch)
      self.health = self.track_health(self.health, step_metrics, np.int32(step_number))
      if self.block_each_step:
        step_metrics["train/loss"].block_until_ready()
      self.latest = (step_number, step_metrics)
      if _due(step_number, self.config.log.every, self.total):
        self.pending.append((step_number, step_metrics, self.health))
      self.meter.tokens += self.tokens_per_step
      self.window_steps += 1
      while self.pending and self.pending[0][0] <= step_number - RUN_AHEAD:
        self.handle(*self.pending.popleft())
        if self.rolled_back:
          return

  def flush(self) -> None:
    """Everything up to the last dispatched step: log steps, skips, the summary's values."""
    with self.meter.phase("train"):
      while self.pending and not self.rolled_back:
        self.handle(*self.pending.popleft())
      if not self.rolled_back:
        self.check_health(self.health)
      if not self.rolled_back and self.latest is not None:
        self.summarise({k: float(v) for k, v in jax.device_get(self.latest[1]).items()})

  def check_health(self, health) -> None:
    """Reports the steps skipped since the last check, in order, and acts on them."""
    health = jax.device_get(health)
    count = int(health["count"])
    if count == self.skips_seen:
      return
    first = max(self.skips_seen, count - step_lib.HEALTH_RING)
    if first > self.skips_seen:
      log.warning("%d more steps were skipped before these (not listed)", first - self.skips_seen)
    self.skips_seen = count
    for index in range(first, count):
      slot = index % step_lib.HEALTH_RING
      record = {name: health[name][slot].item() for name in RECORD_FIELDS}
      self.on_skipped(record)
      if self.rolled_back:
        return

  def summarise(self, values: dict[str, float]) -> None:
    self.summary["train/loss"] = values["train/loss"]
    self.summary["skipped_nonfinite"] = int(values["train/skipped_nonfinite_total"])
    self.summary["skipped_spikes"] = int(values["train/skipped_spikes_total"])

  def handle(self, step_number: int, device_metrics, health) -> None:
    """A log step's metrics, fetched RUN_AHEAD steps late: health checks, then the log line."""
    self.check_health(health)
    if self.rolled_back:
      return
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    tokens_per_second, mfu = self.meter.record_window(
      self.window_steps * self.tokens_per_step, now - self.window_start
    )
    self.window_start, self.window_steps = now, 0
    values.update({"perf/tokens_per_second": tokens_per_second, "perf/mfu": mfu})
    values["train/tokens_seen"] = float(step_number * self.tokens_per_step)
    values.update(self.mixture_shares())
    self.writer.write(step_number, values)
    self.progress.update(step_number, values["train/loss"], tokens_per_second, mfu)
    self.summarise(values)

  def mixture_shares(self) -> dict[str, float]:
    """data/share/<source>: the share of the target tokens this process has consumed from each
    source of a mixture (data.mixture), since this attempt started; {} without a mixture."""
    mix = getattr(self.run.pipeline, "mixture", None)
    if mix is None:
      return {}
    weights = mix.weights_at(self.step_index)
    self.summary["data_mixture"] = {
      spec: dict(counts, weight=float(weight))
      for (spec, counts), weight in zip(mix.realised().items(), weights, strict=True)
    }
    return {
      f"data/share/{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec)}": counts["share"]
      for spec, counts in mix.realised().items()
    }

  def on_skipped(self, record: dict[str, Any]) -> None:
    """One skipped step, as recorded on the device: log, count in a row, roll back on spikes."""
    step_number, in_a_row = int(record["step"]), int(record["in_a_row"])
    loss, grad_norm = float(record["loss"]), float(record["grad_norm"])
    kind = "loss spike" if record["spike"] else "non-finite loss or gradients"
    log.warning(
      "step %d skipped (%s): loss %s, grad norm %s; %d in a row",
      step_number,
      kind,
      loss,
      grad_norm,
      in_a_row,
    )
    self.writer.write(
      step_number,
      {"event": f"skipped: {kind}", "train/loss": loss, "train/grad_norm": grad_norm},
    )
    limit = self.config.train.max_consecutive_skips
    if in_a_row >= limit:
      raise DivergenceError(
        f"training diverged: {in_a_row} consecutive steps skipped up to step "
        f"{step_number} (last loss {loss}, grad norm "
        f"{grad_norm}; train.max_consecutive_skips={limit}). Lower "
        f"optim.learning_rate, raise optim.warmup_steps, or check the data; the last good "
        f"checkpoint is in {self.ckpt.directory}"
      )
    if record["spike"] and self.config.train.spike_policy == "rollback":
      self.rollback(step_number)

  def rollback(self, spike_step: int) -> None:
    """Back to the newest checkpoint; the data between it and the spike is skipped for good."""
    if self.summary["rollbacks"] >= self.config.train.max_rollbacks:
      raise DivergenceError(
        f"loss spike at step {spike_step} after {self.summary['rollbacks']} rollbacks "
        f"(train.max_rollbacks={self.config.train.max_rollbacks}); stopping. Lower "
        f"optim.learning_rate or inspect the data around step {spike_step}"
      )
    self.ckpt.wait()
    latest = self.ckpt.latest_step()
    if latest is None:
      log.warning(
        "loss spike at step %d: no checkpoint to roll back to yet; step skipped", spike_step
      )
      return
    self.pending.clear()  # steps after the checkpoint are discarded, and what they recorded
    self.latest = None
    self.health, self.skips_seen = self.new_health(), 0
    self.state = self.ckpt.restore(latest, self.run.spec.abstract)
    skipped = spike_step - latest  # data positions of steps latest+1 .. spike_step
    offset = int(jax.device_get(self.state["data_offset"])) + skipped
    self.state = dict(
      self.state,
      data_offset=jax.device_put(np.int32(offset), self.run.spec.shardings["data_offset"]),
    )
    # The steps after the checkpoint ran and are thrown away: goodput lost (report.json).
    self.summary["redone_steps"] += max(self.step_index + 1, spike_step) - latest
    self.step_index = latest
    self.open_batches()
    self.summary["rollbacks"] += 1
    self.rolled_back = True
    log.warning(
      "rolled back to step %d after a loss spike at step %d; skipping %d batches of "
      "data (data offset now %d)",
      latest,
      spike_step,
      skipped,
      offset,
    )
    self.writer.write(spike_step, {"event": "rollback", "to_step": latest, "data_offset": offset})

  def evaluate(self, step_number: int) -> None:
    with self.meter.phase("eval"):
      eval_metrics = evaluate(self.run, self.state["params"], self.eval_batches)
      sample = generation.sample_for_eval(self.run, self.state["params"])
      if self.config.harness.tasks:
        from train.inference import harness  # noqa: PLC0415 (lm-eval: only when asked for)

        eval_metrics.update(harness.evaluate_run(self.run, self.state["params"], step_number))
    self.writer.write(step_number, eval_metrics)
    self.summary.update(eval_metrics)
    if self.run.is_main:
      log.info(
        "eval at step %d: %s",
        step_number,
        ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()),
      )
      if sample is not None:
        log.info("sample at step %d: %r", step_number, sample)
    # Eval time is not train throughput: the measuring window restarts after it.
    self.window_start, self.window_steps = time.perf_counter(), 0


def train_loop(
  run,
  state,
  start_step: int,
  ckpt: Checkpointer,
  writer: metrics_writer.MetricsWriter,
  watcher,
  metadata: dict[str, Any],
) -> dict[str, Any]:
  """Runs steps start_step+1 .. config.train.steps (or until preempted); returns a summary.

  ``metadata`` (config, data fingerprint, model config) is saved with every checkpoint.
  """
  return _Loop(run, state, start_step, ckpt, writer, watcher, metadata).run_all()
