"""Orbax checkpoints of the train state plus JSON metadata (config, data fingerprint, model config).

A checkpoint holds two items: ``state`` (the train state pytree; the data position is its step) and
``metadata`` (JSON). Orbax writes each save into a temporary directory and renames it when complete,
so ``latest_step()`` only ever names complete checkpoints. Restores always pass an abstract target
with the current shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by a run with other data or another model."""


class Checkpointer:
  """The run's CheckpointManager under ``WORKDIR/checkpoints``."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # removes saves that were interrupted by a crash
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "metadata"), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> bool:
    """Starts saving (in the background when async); returns whether a save was started."""
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)),
        force=True,
    )

  def metadata(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return restored["metadata"]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores ``state`` at ``step`` into the shardings of ``abstract_state``."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until a background save has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def check_compatible(saved: dict[str, Any], current: dict[str, Any], *, path: str,
                     allow_mismatch: bool) -> list[str]:
  """Compares the saved and current data fingerprint and model config.

  Returns the differences found (for the log). Raises CheckpointMismatchError unless
  ``allow_mismatch``; a model whose shapes differ fails at restore regardless.
  """
  problems = []
  if saved.get("data_fingerprint") != current["data_fingerprint"]:
    problems.append(
        f"data fingerprint {saved.get('data_fingerprint')!r} in the checkpoint, "
        f"{current['data_fingerprint']!r} now")
  saved_model, current_model = saved.get("model_config", {}), current["model_config"]
  for key in sorted(set(saved_model) | set(current_model)):
    if saved_model.get(key) != current_model.get(key):
      problems.append(
          f"model.{key}={saved_model.get(key)!r} in the checkpoint, {current_model.get(key)!r} now")
  if problems and not allow_mismatch:
    raise CheckpointMismatchError(
        f"the checkpoint in {path} was written by a different run: " + "; ".join(problems)
        + ". Use a new --workdir, or pass --config.checkpoint.allow_mismatch=True to resume anyway.")
  return problems


