"""Preemption: SIGTERM (Cloud TPU, GKE, Slurm) or SIGINT ends the run at a step boundary, saved.

On a single process a signal handler sets a flag. With ``jax.distributed`` running, JAX's own
preemption notifier owns SIGTERM, and every process asks
``multihost_utils.reached_preemption_sync_point(step)`` each step, so all agree on the same save
step. Further signals while stopping are logged and ignored: the save in progress is atomic anyway.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

from input_pipeline.host import agreement

log = logging.getLogger("loom")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again" — the work directory holds a checkpoint to resume


class PreemptionWatcher:
  """Tells the loop when to save and stop."""

  def __init__(self):
    self._signal: int | None = None
    self._previous = {}
    self._multi = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      # Across processes only the coordinated sync point may decide (a local flag would make one
      # process stop alone and hang the others in their next collective).
      signals = () if self._multi else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self._signal is None:
      self._signal = signum
      log.warning("%s received: finishing the current step, then saving a checkpoint", name)
    else:
      log.warning("%s received again: already stopping, the checkpoint is being saved", name)

  def should_stop(self, step: int) -> bool:
    if self._signal is not None:
      return True
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return False

  def noticed(self) -> bool:
    """Whether a stop was asked for, here or (across processes) anywhere, without waiting for
    the agreed step: a save that hangs must not outlast a preemption's grace period."""
    return self._signal is not None or (self._multi and agreement.preemption_noticed())

  @property
  def reason(self) -> str:
    return signal.Signals(self._signal).name if self._signal is not None else "SIGTERM (cluster)"

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
