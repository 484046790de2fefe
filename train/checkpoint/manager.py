"""Orbax checkpoints of the train state plus JSON metadata (config, data fingerprint, model config).

A checkpoint holds two items: ``state`` (the train state pytree; the data position is its step) and
``metadata`` (JSON). Orbax writes each save into a temporary directory and renames it when complete,
so ``latest_step()`` only ever names complete checkpoints. Restores always pass an abstract target
with the current shardings, so a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from input_pipeline.host import agreement, storage
from input_pipeline.host.command import EXIT_IO, LoomError
from models.config import ModelConfig
from train.checkpoint.integrity import is_sealed, num_parts, parts_for, seal, verify

log = logging.getLogger("loom")


class CheckpointMismatchError(LoomError, ValueError):
  """The checkpoint was written by a run with other data or another model."""


class CheckpointSaveError(LoomError, RuntimeError):
  """A save failed (full disk, lost permissions, ...); the older checkpoints are untouched."""

  exit_code = EXIT_IO


class CheckpointCorruptError(LoomError, ValueError):
  """No checkpoint of the run could be verified and restored."""


class Checkpointer:
  """The run's CheckpointManager under ``WORKDIR/checkpoints``, with checksums and fallback.

  Sealing runs off the training thread: after each save a thread waits for Orbax to finish and
  then hashes the files this process wrote (``integrity.py``); the next save, a restore or
  ``wait()`` joins it. Which checkpoint to restore and whether to quarantine one are decided by
  process 0 and agreed by all (``train/cluster/agreement.py``); only process 0 moves files.
  """

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool, compress: bool = False):
    self.directory = os.fspath(storage.absolute(directory))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # removes saves that were interrupted by a crash
      create=True,
    )
    # zstd on float weights and moments saves ~8% of the bytes and costs ~3x the CPU time of the
    # write (1.36 GB: 3.1 against 1.0 CPU-seconds here), which a CPU host takes from its steps.
    handlers = {"state": ocp.PyTreeCheckpointHandler(use_compression=compress)}
    self._manager = ocp.CheckpointManager(
      self.directory, item_names=("state", "metadata"), item_handlers=handlers, options=options
    )
    self._sealer: threading.Thread | None = None
    self._sealer_error: BaseException | None = None
    self._sealing_step: int | None = None
    self.process, self.num_processes = jax.process_index(), jax.process_count()
    self.is_main = self.process == 0
    self.seal_seconds = 0.0  # hashing time, spent on the sealing thread
    self._failed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return f"{self.directory}/{step}"

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> bool:
    """Starts saving (in the background when async); returns whether a save was started.

    The previous save is finished and sealed first.
    """
    self.wait()
    started = self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), metadata=ocp.args.JsonSave(metadata)
      ),
      force=True,
    )
    if started:
      self._sealing_step = step
      self._sealer = threading.Thread(
        target=self._finish_and_seal, args=(step,), name=f"loom-seal-{step}", daemon=True
      )
      self._sealer.start()
    return started

  def _finish_and_seal(self, step: int) -> None:
    try:
      self._manager.wait_until_finished()
      step_dir = storage.absolute(self.step_dir(step))
      _await_finalized(step_dir)
      start = time.perf_counter()
      try:
        hashed = seal(step_dir, self.process, self.num_processes)
      except FileNotFoundError as e:
        # Seen once in ~20 runs of 4 processes on one disk: the step directory missing right
        # after it was seen finalised. Wait for it again, once, and say so.
        log.warning("sealing step %d: %s; waiting for %s again", step, e, step_dir)
        time.sleep(1.0)
        _await_finalized(step_dir, timeout_s=120.0)
        hashed = seal(step_dir, self.process, self.num_processes)
      self.seal_seconds += time.perf_counter() - start
      log.debug("sealed part %d of step %d: %d bytes hashed", self.process, step, hashed)
    except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
      self._sealer_error = e

  def metadata(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return restored["metadata"]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores ``state`` at ``step`` into the shardings of ``abstract_state``."""
    self.wait()
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          abstract_state,
          restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        )
      ),
    )
    return restored["state"]

  def wait(self) -> None:
    """Blocks until a background save has finished and this process's part of it is sealed."""
    if self._sealer is not None:
      self._sealer.join()
    self._sealer = None
    error, self._sealer_error = self._sealer_error, None
    step, self._sealing_step = self._sealing_step, None
    if error is not None:
      self._failed = True
      good = [s for s in self.all_steps() if s != step]
      raise CheckpointSaveError(
        f"saving the checkpoint of step {step} under {self.directory} failed: "
        f"{type(error).__name__}: {str(error)[:400]}. Older checkpoints are intact (latest: "
        f"{max(good) if good else 'none'}); fix the cause (free disk space?) and rerun the "
        f"same command to resume."
      ) from error

  def quarantine(self, step: int, reason: str) -> str:
    """Moves a bad checkpoint aside (never deletes it) so the run can go on without it.

    Process 0 moves it; every process waits for the move, then re-reads the step list."""
    stamp = agreement.from_main("quarantine-stamp", time.strftime("%Y%m%d-%H%M%S"))
    target = storage.absolute(self.directory).parent / "checkpoints_corrupt" / f"{step}-{stamp}"
    if self.is_main:
      target.parent.mkdir(parents=True, exist_ok=True)
      storage.absolute(self.step_dir(step)).rename(target)
      storage.write_atomic(target / "REASON.txt", reason + "\n")
    agreement.barrier(f"quarantined-{step}")
    self._manager.reload()
    return os.fspath(target)

  def _problems(self, step: int, verify_checksums: bool) -> list[str]:
    """Checks this process's share of the seal, then agrees: every process gets all problems."""
    problems = []
    if verify_checksums:
      written_by = num_parts(self.step_dir(step)) or 1
      parts = parts_for(self.process, self.num_processes, written_by)
      problems = verify(self.step_dir(step), parts)
    if self.num_processes == 1:
      return problems
    everyone = agreement.gather(f"verified-{step}", json.dumps(problems))
    return [problem for answer in everyone for problem in json.loads(answer)]

  def restore_latest_good(
    self, abstract_state: Any, *, verify_checksums: bool, check_metadata
  ) -> tuple[int, Any] | None:
    """Restores the newest checkpoint that verifies and loads; None if there is none at all.

    A checkpoint whose checksums fail, or whose files cannot be decoded, is reported by path,
    moved to ``checkpoints_corrupt/`` and the next older one is tried. Anything else that stops
    a restore (a shape that does not fit the model, memory, a timeout of the store) is raised
    with its cause and the checkpoint stays where it is. ``check_metadata(metadata)`` may raise
    to refuse a checkpoint of another run. Process 0 names each candidate step; all agree.
    """
    failures = []
    while True:
      mine = self.all_steps()
      step = int(agreement.from_main("restore-step", str(max(mine) if mine else -1)))
      if step < 0:
        if failures:
          raise CheckpointCorruptError(
            f"no checkpoint in {self.directory} could be restored; all were moved to "
            f"checkpoints_corrupt/: " + " | ".join(failures)
          )
        return None
      step_dir = self.step_dir(step)
      problems = self._problems(step, verify_checksums)
      if not problems:
        try:
          metadata = self.metadata(step)
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means a bad checkpoint
          problems = [f"{step_dir}: metadata unreadable ({type(e).__name__}: {e})"]
      if not problems:
        check_metadata(metadata)  # a mismatch is the user's decision, not corruption: raise
        try:
          state = self.restore(step, abstract_state)
        except Exception as e:
          if not _is_format_failure(e):
            raise
          problems = [f"{step_dir}: restore failed ({type(e).__name__}: {str(e)[:300]})"]
      if not problems:
        if not is_sealed(step_dir):
          # Complete in Orbax's eyes, but the processes died before sealing it.
          seal(step_dir, self.process, self.num_processes)
        return step, state
      reason = "; ".join(problems)
      log.error("checkpoint at step %d is corrupt, falling back to an older one: %s", step, reason)
      moved = self.quarantine(step, reason)
      log.error("moved the corrupt checkpoint to %s", moved)
      failures.append(reason)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:
        if not self._failed:
          raise
        # Orbax reports a failed background save again at close; it was raised already.
        log.debug("checkpoint manager close after a failed save", exc_info=True)


def _await_finalized(step_dir, timeout_s: float = 600.0) -> None:
  """Waits until process 0 has finalised a save (renamed it into place; on object stores, which
  cannot rename, written its commit marker): other processes finish their own part earlier."""
  deadline = time.monotonic() + timeout_s
  marker = step_dir / "commit_success.txt" if storage.is_remote(step_dir) else step_dir
  while not marker.exists():
    if time.monotonic() > deadline:
      raise TimeoutError(f"{step_dir} was not finalised by process 0 within {timeout_s:.0f} s")
    time.sleep(0.05)


def _is_format_failure(error: Exception) -> bool:
  """Whether a restore failed because the files are not a readable checkpoint (quarantine), as
  opposed to a target that does not fit, memory, or a store that timed out (raise)."""
  if isinstance(error, (MemoryError, TimeoutError, ConnectionError)):
    return False
  text = str(error).lower()
  not_the_files = ("shape", "out of memory", "resource_exhausted", "deadline", "timed out")
  return not any(word in text for word in not_the_files)


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
  directory = os.fspath(storage.absolute(workdir) / "checkpoints")
  if not storage.absolute(directory).is_dir():
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
