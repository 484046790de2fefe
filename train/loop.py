"""The training loop's mechanics: dispatch ahead, fetch on log steps, eval, checkpoint, stop.

The host never waits for the device between log steps: a step's metrics stay on the device
unless it is a log step, whose metrics are fetched once RUN_AHEAD more steps are queued behind
it, and skipped steps are recorded on the device (``health.track_health``) and read with them.
What a skipped step calls for (go on, roll back, stop) is decided by ``train/health.py``; this
module carries it out. The eval is ``train/validation.py``'s; the batches come from the trainer
(``Run.train_batches``, with any fault injection of ``train/faults.py`` already applied).

Called by ``trainer.train_and_evaluate`` with everything built; it owns no set-up of its own.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from input_pipeline.device import to_global
from train import health, metrics_writer, profiling
from train.checkpoint.manager import Checkpointer
from train.cluster import mesh as mesh_lib
from train.validation import Validation

log = logging.getLogger("loom")

RUN_AHEAD = 2  # steps dispatched after a log step before its metrics are fetched


def _due(step_number: int, every: int, last: int) -> bool:
  return step_number == last or (every > 0 and step_number % every == 0)


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
    self.policy = health.Policy.from_config(self.config.train)
    self.block_each_step = mesh_lib.bound_steps_in_flight()
    self.progress = metrics_writer.Progress(
      self.total, start_step, enabled=run.is_main and self.config.log.progress
    )
    self.summary: dict[str, Any] = {"preempted": False, "rollbacks": 0, "redone_steps": 0}
    self.rolled_back = False
    # Log steps' (step number, metrics, health) on the device, awaiting a fetch; and the latest
    # step's, for the summary at the end.
    self.pending: collections.deque = collections.deque()
    self.latest = None
    replicated = mesh_lib.replicated(run.mesh)
    self.new_health = jax.jit(health.init_health, out_shardings=replicated)
    self.track_health = jax.jit(health.track_health)  # not donated: log steps keep theirs
    self.health, self.skips_seen = self.new_health(), 0
    # The throughput window: from when step window_from was done to a log step's fetch. It
    # counts the steps done in between, not those dispatched (two run ahead of the fetch).
    self.window_start, self.window_from = time.perf_counter(), start_step
    window = tuple(self.config.log.profile_steps) or (None, None)
    self.profiler = profiling.StepProfiler(os.path.join(run.workdir, "profile"), *window)
    self.open_batches()
    self.validation = Validation(run)

  def open_batches(self) -> None:
    """Batches from data position (step + data offset): O(1) to reopen anywhere."""
    self.data_offset = int(jax.device_get(self.state["data_offset"]))
    self.batches = self.run.train_batches(self.step_index + self.data_offset)

  def run_all(self) -> dict[str, Any]:
    while self.step_index < self.total:
      self.rolled_back = False
      step_number = self.step_index + 1  # the state's step after this update
      self.dispatch(step_number)
      eval_due = _due(step_number, self.config.train.eval_every, self.total)
      stop = self.watcher.should_stop(step_number)
      save_due = stop or _due(step_number, self.config.checkpoint.every, self.total)
      local = self.ckpt.local
      local_due = local is not None and not save_due and local.due(step_number)
      if eval_due or save_due or local_due:
        self.flush()  # the health checks of the last step come before evals and saves
      if self.rolled_back:
        continue  # the state and the data position now come from the checkpoint
      self.step_index = step_number
      if eval_due:
        self.run_eval(step_number)
      if save_due:
        with self.meter.phase("checkpoint"):
          self.writer.flush()  # every line up to this checkpoint is durable before it exists
          self.ckpt.save(step_number, self.state, self.metadata)
      elif local_due:
        with self.meter.phase("checkpoint"):  # the copy to host memory; the writes go on beside
          self.writer.flush()  # a restart from this step finds every line up to it
          local.save(step_number, self.state, self.metadata)
      if stop:
        with self.meter.phase("checkpoint"):
          self.ckpt.wait(last=True)
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
      batch = to_global(next(self.batches), self.run.batch_sharding)
    with self.meter.phase("train"), self.profiler.step(step_number, lambda: self.state):
      self.state, step_metrics = self.run.compiled_step(self.state, batch)
      self.health = self.track_health(self.health, step_metrics, np.int32(step_number))
      if self.block_each_step:
        step_metrics["train/loss"].block_until_ready()
      self.latest = (step_number, step_metrics)
      if _due(step_number, self.config.log.every, self.total):
        self.pending.append((step_number, step_metrics, self.health))
      self.meter.tokens += self.tokens_per_step
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

  def check_health(self, device_health) -> None:
    """Reports the steps skipped since the last check, in order, and acts on each."""
    skips, missed = health.unseen_skips(jax.device_get(device_health), self.skips_seen)
    if missed:
      log.warning("%d more steps were skipped before these (not listed)", missed)
    self.skips_seen += missed + len(skips)
    for skip in skips:
      self.on_skipped(skip)
      if self.rolled_back:
        return

  def summarise(self, values: dict[str, float]) -> None:
    self.summary["train/loss"] = values["train/loss"]
    self.summary["skipped_nonfinite"] = int(values["train/skipped_nonfinite_total"])
    self.summary["skipped_spikes"] = int(values["train/skipped_spikes_total"])

  def handle(self, step_number: int, device_metrics, device_health) -> None:
    """A log step's metrics, fetched RUN_AHEAD steps late: health checks, then the log line."""
    self.check_health(device_health)
    if self.rolled_back:
      return
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()
    done = max(step_number - self.window_from, 0)  # its metrics fetched: every step to it ran
    tokens_per_second, mfu = self.meter.record_window(
      done * self.tokens_per_step, now - self.window_start
    )
    self.window_start, self.window_from = now, step_number
    values.update({"perf/tokens_per_second": tokens_per_second, "perf/mfu": mfu})
    values["train/tokens_seen"] = float(step_number * self.tokens_per_step)
    shares, mixture_report = self.run.pipeline.consumption(self.step_index)
    values.update(shares)
    if mixture_report is not None:
      self.summary["data_mixture"] = mixture_report
    self.writer.write(step_number, values)
    self.progress.update(step_number, values["train/loss"], tokens_per_second, mfu)
    self.summarise(values)

  def on_skipped(self, skip: health.Skip) -> None:
    """One skipped step: logged, then what the policy calls for."""
    log.warning(
      "step %d skipped (%s): loss %s, grad norm %s; %d in a row",
      skip.step,
      skip.kind,
      skip.loss,
      skip.grad_norm,
      skip.in_a_row,
    )
    event = {"event": f"skipped: {skip.kind}", "train/loss": skip.loss}
    self.writer.write(skip.step, {**event, "train/grad_norm": skip.grad_norm})
    action = health.after_skip(skip, self.policy, self.summary["rollbacks"], self.ckpt.directory)
    if action is health.Action.ROLLBACK:
      self.rollback(skip.step)

  def rollback(self, spike_step: int) -> None:
    """Back to the newest checkpoint; the data between it and the spike is skipped for good."""
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
    with self.meter.phase("checkpoint"):  # lost time, not training
      self.state = self.ckpt.restore(latest, self.run.spec.abstract)
    if self.ckpt.local is not None:
      self.ckpt.local.discard_after(latest)  # the steps after it are another trajectory now
    plan = health.plan_rollback(
      spike_step, latest, int(jax.device_get(self.state["data_offset"])), self.step_index + 1
    )
    offset = jax.device_put(np.int32(plan.data_offset), self.run.spec.shardings["data_offset"])
    self.state = dict(self.state, data_offset=offset)
    # The steps after the checkpoint ran and are thrown away: goodput lost (report.json).
    self.summary["redone_steps"] += plan.redone_steps
    self.step_index = plan.to_step
    self.window_start, self.window_from = time.perf_counter(), plan.to_step
    self.open_batches()
    self.summary["rollbacks"] += 1
    self.rolled_back = True
    log.warning(
      "rolled back to step %d after a loss spike at step %d; skipping %d batches of "
      "data (data offset now %d)",
      plan.to_step,
      spike_step,
      plan.skipped_batches,
      plan.data_offset,
    )
    self.writer.write(
      spike_step, {"event": "rollback", "to_step": plan.to_step, "data_offset": plan.data_offset}
    )

  def run_eval(self, step_number: int) -> None:
    with self.meter.phase("eval"):
      eval_metrics, sample = self.validation(
        self.state["params"], step_number, self.state.get("reference")
      )
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
    # Eval time is not train throughput: the measuring window restarts after it (every step to
    # this one has run: the flush before the eval fetched them).
    self.window_start, self.window_from = time.perf_counter(), step_number


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
