"""Orbax checkpoints of the train state plus JSON metadata (config, data fingerprint, model config).

A checkpoint holds two items: ``state`` (the train state pytree; the data position is its step) and
``metadata`` (JSON). Orbax writes each save into a temporary directory and renames it when complete,
so ``latest_step()`` only ever names complete checkpoints. Restores always pass an abstract target
with the current shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from models.config import ModelConfig
from train.checkpoint.integrity import is_sealed, seal, verify

log = logging.getLogger("loom")


class CheckpointMismatchError(ValueError):
  """The checkpoint was written by a run with other data or another model."""


class CheckpointSaveError(RuntimeError):
  """A save failed (full disk, lost permissions, ...); the older checkpoints are untouched."""


class CheckpointCorruptError(ValueError):
  """No checkpoint of the run could be verified and restored."""


class Checkpointer:
  """The run's CheckpointManager under ``WORKDIR/checkpoints``, with checksums and fallback."""

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # removes saves that were interrupted by a crash
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, item_names=("state", "metadata"), options=options
    )
    self._unsealed: list[int] = []
    self.is_main = jax.process_index() == 0

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> bool:
    """Starts saving (in the background when async); returns whether a save was started.

    The previous save is finished and sealed with its checksums first.
    """
    self.wait()
    started = self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)
      ),
      force=True,
    )
    if started:
      self._unsealed.append(step)
    return started

  def _seal_finished(self) -> None:
    for step in self._unsealed:
      if self.is_main and os.path.isdir(self.step_dir(step)):
        seal(self.step_dir(step))
    self._unsealed = []

  def metadata(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return restored["metadata"]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores ``state`` at ``step`` into the shardings of ``abstract_state``."""
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored["state"]

  def wait(self) -> None:
    """Blocks until a background save has finished, then seals it."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - Orbax re-raises whatever its writer threads hit
      steps, self._unsealed = self._unsealed, []
      good = [step for step in self.all_steps() if step not in steps]
      raise CheckpointSaveError(
        f"saving the checkpoint of step {steps} under {self.directory} failed: "
        f"{type(e).__name__}: {str(e)[:400]}. Older checkpoints are intact (latest: "
        f"{max(good) if good else 'none'}); fix the cause (free disk space?) and rerun the "
        f"same command to resume."
      ) from e
    self._seal_finished()

  def quarantine(self, step: int, reason: str) -> str:
    """Moves a bad checkpoint aside (never deletes it) so the run can go on without it."""
    target = os.path.join(
      os.path.dirname(self.directory),
      "checkpoints_corrupt",
      f"{step}-{time.strftime('%Y%m%d-%H%M%S')}",
    )
    if self.is_main:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self.step_dir(step), target)
      with open(os.path.join(target, "REASON.txt"), "w") as f:
        f.write(reason + "\n")
    self._manager.reload()
    return target

  def restore_latest_good(
    self, abstract_state: Any, *, verify_checksums: bool, check_metadata
  ) -> tuple[int, Any] | None:
    """Restores the newest checkpoint that verifies and loads; None if there is none at all.

    A corrupt checkpoint is reported by path, moved to ``checkpoints_corrupt/`` and the next older
    one is tried. ``check_metadata(metadata)`` may raise to refuse a checkpoint of another run.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for step in steps:
      step_dir = self.step_dir(step)
      problems = verify(step_dir) if verify_checksums else []
      if not problems:
        try:
          metadata = self.metadata(step)
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means a bad checkpoint
          problems = [f"{step_dir}: metadata unreadable ({type(e).__name__}: {e})"]
      if not problems:
        check_metadata(metadata)  # a mismatch is the user's decision, not corruption: raise
        try:
          state = self.restore(step, abstract_state)
        except Exception as e:  # noqa: BLE001 - a truncated or garbled array file
          problems = [f"{step_dir}: restore failed ({type(e).__name__}: {str(e)[:300]})"]
      if not problems:
        if self.is_main and not is_sealed(step_dir):
          seal(step_dir)  # complete in Orbax's eyes, but the process died before sealing it
        return step, state
      reason = "; ".join(problems)
      log.error("checkpoint at step %d is corrupt, falling back to an older one: %s", step, reason)
      moved = self.quarantine(step, reason)
      log.error("moved the corrupt checkpoint to %s", moved)
      failures.append(reason)
    raise CheckpointCorruptError(
      f"no checkpoint in {self.directory} could be restored; all were moved to "
      f"checkpoints_corrupt/: " + " | ".join(failures)
    )

  def close(self) -> None:
    self._manager.close()


def check_compatible(
  saved: dict[str, Any], current: dict[str, Any], *, path: str, allow_mismatch: bool
) -> list[str]:
  """Compares the saved and current data fingerprint and model config.

  Returns the differences found (for the log). Raises CheckpointMismatchError unless
  ``allow_mismatch``; a model whose shapes differ fails at restore regardless.
  """
  problems = []
  if saved.get("data_fingerprint") != current["data_fingerprint"]:
    problems.append(
      f"data fingerprint {saved.get('data_fingerprint')!r} in the checkpoint, "
      f"{current['data_fingerprint']!r} now"
    )
  # Checkpoints from before a model field existed hold that field's default.
  fields = dataclasses.fields(ModelConfig)
  defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
  saved_model = {**defaults, **saved.get("model_config", {})}
  current_model = current["model_config"]

  def same(a: Any, b: Any) -> bool:  # JSON gives lists where the config holds tuples
    return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)

  for key in sorted(set(saved_model) | set(current_model)):
    if not same(saved_model.get(key), current_model.get(key)):
      problems.append(
        f"model.{key}={saved_model.get(key)!r} in the checkpoint, {current_model.get(key)!r} now"
      )
  if problems and not allow_mismatch:
    raise CheckpointMismatchError(
      f"the checkpoint in {path} was written by a different run: "
      + "; ".join(problems)
      + ". Use a new --workdir, or pass --config.checkpoint.allow_mismatch=True to resume anyway."
    )
  return problems


def open_read_only(workdir: str) -> tuple[ocp.CheckpointManager, list[int]]:
  """A read-only view of ``workdir/checkpoints`` and its complete steps (error if none)."""
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"--workdir {workdir} has no checkpoints ({directory} does not exist); train first with "
      f"python -m train --workdir {workdir}"
    )
  # Read-only: generation must never create, clean up or delete anything in a run's directory.
  manager = ocp.CheckpointManager(
    directory,
    item_names=("state", "metadata"),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"--workdir {workdir} has no complete checkpoint in {directory}")
  return manager, steps


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params: Any) -> Any:
  """Only the parameters of ``step`` (any subset of them), in ``abstract_params``' shardings."""
  abstract = {"params": abstract_params}
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
      )
    ),
  )
  return restored["state"]["params"]
