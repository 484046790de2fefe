"""Fault injection for the tests of the failure paths (the config's ``debug`` group).

Bad data at chosen data positions, as a real bad batch would arrive: ``debug.nan_steps`` poisons
a batch's loss weights with NaN (its loss and gradients become non-finite), ``debug.spike_steps``
turns every target into the last id, which the model has learned never to predict (a loss spike).
Positions are 1-based data positions (step + data offset), so injected faults follow the data
through rollbacks, as bad data would. The trainer wraps the batch iterator with ``inject``; the
loop never sees the ``debug`` keys. ``debug.kill_at_step`` kills the process (SIGKILL, as a
lost host dies) once that step's local checkpoint is saved and replicated and every persistent
save in flight is complete (``kill_after``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np

from input_pipeline.host import agreement

Batch = dict[str, np.ndarray]


def poison(batch: Batch) -> Batch:
  """NaN loss weights: this step's loss and gradients become NaN."""
  return dict(batch, weights=np.full_like(batch["weights"], np.nan))


def spike(batch: Batch, vocab_size: int) -> Batch:
  """Every target becomes ``vocab_size - 1``: a loss far above the running mean."""
  return dict(batch, targets=np.full_like(batch["targets"], vocab_size - 1))


def inject(
  batches: Iterator[Batch], debug: Any, *, first_position: int, vocab_size: int
) -> Iterator[Batch]:
  """``batches`` (the first at 1-based data position ``first_position``) with the ``debug``
  group's faults applied; ``batches`` itself when it asks for none."""
  nan_steps, spike_steps = set(debug.nan_steps), set(debug.spike_steps)
  if not nan_steps and not spike_steps:
    return batches

  def faulty() -> Iterator[Batch]:
    for position, batch in enumerate(batches, start=first_position):
      if position in nan_steps:
        batch = poison(batch)
      if position in spike_steps:
        batch = spike(batch, vocab_size)
      yield batch

  return faulty()


def kill_after(ckpt: Any, step: int) -> None:
  """Makes ``ckpt`` (a Checkpointer with a local tier) SIGKILL this process once its local save
  of ``step`` is complete and replicated and no persistent save is still in flight: the tests
  then know exactly which checkpoints each tier holds when the process dies (an async
  persistent save still running under load would otherwise be lost at random)."""
  tier = ckpt.local
  save = tier.save

  def save_then_kill(number: int, state: Any, metadata: dict) -> None:
    save(number, state, metadata)
    if number == step:
      tier.wait()
      ckpt.wait()  # the persistent tier's save in flight, if any, sealed by every process
      agreement.barrier(f"kill-at-{step}")  # every process's saves (and replicas) are complete
      os.kill(os.getpid(), signal.SIGKILL)

  tier.save = save_then_kill
