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
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from input_pipeline.host import agreement, storage
from input_pipeline.host.command import EXIT_IO, EXIT_PREEMPTED, LoomError
from models.config import SCHEDULE_FIELDS, ModelConfig
from train.checkpoint import save_outcome
from train.checkpoint.integrity import is_sealed, num_parts, parts_for, seal, verify
from train.checkpoint.local_tier import LocalTier

log = logging.getLogger("loom")


class CheckpointMismatchError(LoomError, ValueError):
  """The checkpoint was written by a run with other data or another model."""


class CheckpointSaveError(LoomError, RuntimeError):
  """A save failed (full disk, lost permissions, ...); the older checkpoints are untouched."""

  exit_code = EXIT_IO


class CheckpointSaveInterrupted(LoomError, RuntimeError):
  """A stop was asked for while a save hung; the save was given up, older checkpoints intact."""

  exit_code = EXIT_PREEMPTED
  orderly_exit = False  # the given-up save's threads may still wait: no shutdown barrier


class CheckpointCorruptError(LoomError, ValueError):
  """No checkpoint of the run could be verified and restored."""


# How long a save may go on after a stop was asked for (SIGTERM): preemptions give ~30 s.
GRACE_AFTER_STOP_S = 15.0
# How long a process waits for its own save threads after another process's part failed.
PEER_GRACE_S = 10.0


class _OwnPartFailed(agreement.BarrierAborted):
  """Raised at Orbax's barrier by the process whose own part of a save failed."""


class Checkpointer:
  """The run's CheckpointManager under ``WORKDIR/checkpoints``, with checksums and fallback.

  Sealing runs off the training thread: after each save a thread waits for Orbax to finish and
  then hashes the files this process wrote (``integrity.py``); the next save, a restore or
  ``wait()`` joins it. Which checkpoint to restore and whether to quarantine one are decided by
  process 0 and agreed by all (``input_pipeline/host/agreement.py``); only process 0 moves files.

  A save that fails ends in bounded time on every process (docs/reliability.md): Orbax's
  barriers between processes are ``agreement.watched_barrier``s, and the process whose part
  failed says so in the coordination service before it leaves them, so the others stop waiting
  at once instead of at Orbax's timeout. ``wait()`` then agrees the verdict (``save_outcome.py``):
  a failure that may pass is logged and the next save tries again (``save_retries`` failures in
  a row at most); one that will not (full disk, permissions) stops the run with one line naming
  the step, the process and the cause. ``stop_requested`` (a preemption notice) bounds a hanging
  save to GRACE_AFTER_STOP_S.
  """

  def __init__(
    self,
    directory: str,
    *,
    max_to_keep: int,
    async_save: bool,
    compress: bool = False,
    save_timeout_s: float = 1200.0,
    save_retries: int = 2,
    stop_requested: Callable[[], bool] = lambda: False,
  ):
    self.directory = os.fspath(storage.absolute(directory))
    self.save_timeout_s = float(save_timeout_s)
    self.save_retries = save_retries
    self._stop_requested = stop_requested
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,  # removes saves that were interrupted by a crash
      create=True,
      async_options=ocp.AsyncOptions(
        timeout_secs=max(int(save_timeout_s), 1), barrier_sync_fn=self._barrier
      ),
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
    self._saving_step: int | None = None  # the save whose barriers are being waited at
    self._abandoned = False  # a hung save was given up: its threads must not be waited for
    self.failed_saves = 0  # failed saves in a row (reset by a sealed one)
    self.retried_saves = 0  # failed saves that a later save replaced
    self.local: LocalTier | None = None  # the local tier (local_tier.py), when configured
    self.restored_from: dict[str, Any] = {"tier": "none"}  # where the run's state came from

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return f"{self.directory}/{step}"

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> bool:
    """Starts saving (in the background when async); returns whether a save was started.

    The previous save is finished and sealed first; if it failed in a way that may pass, this
    save is its retry.
    """
    self.wait()
    if self.failed_saves:
      self._discard_failure()
    self._saving_step = step
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

  def _barrier(self, key: str, timeout_ms: int) -> None:
    """Orbax's barrier between processes (``AsyncOptions.barrier_sync_fn``), on its threads.

    Orbax reaches some barriers on its way out of a failed save (in ``finally`` clauses, with
    the failure in flight): this process then publishes the failure and leaves at once instead
    of waiting for peers that wait for it. Otherwise it waits until everyone arrives, a peer
    publishes a failure, or this save was given up.
    """
    if self.num_processes == 1:
      return
    failure = sys.exc_info()[1]
    if isinstance(failure, agreement.BarrierAborted):
      raise type(failure)(str(failure))  # on the way out already: do not wait again
    if failure is not None:
      self._publish_failure(failure)
      raise _OwnPartFailed(f"left barrier {key!r}: this process's part of the save failed")
    agreement.watched_barrier(key, timeout_ms / 1000, self._abort_reason)

  def _publish_failure(self, failure: BaseException) -> None:
    step = self._saving_step
    cause = save_outcome.describe(failure)
    log.error("saving step %s failed on process %d: %s", step, self.process, cause)
    agreement.publish(f"save-failed/{step}/{self.process}", cause)

  def _abort_reason(self) -> str | None:
    if self._abandoned:
      return "the save was given up"
    failed = agreement.published(f"save-failed/{self._saving_step}")
    if failed:
      process, cause = sorted(failed.items())[0]
      return f"process {process}'s part of the save of step {self._saving_step} failed ({cause})"
    return None

  def _discard_failure(self) -> None:
    """Clears Orbax's record of the failed save (it raises it again once per calling thread)."""
    try:
      self._manager.wait_until_finished()
    except Exception:  # noqa: BLE001 - the failure reported by wait() already
      log.debug("the failed save's error, raised again by Orbax", exc_info=True)

  def _finish_and_seal(self, step: int) -> None:
    try:
      self._manager.wait_until_finished()
      step_dir = storage.absolute(self.step_dir(step))
      _await_finalized(step_dir, timeout_s=self.save_timeout_s)
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

  def wait(self, *, agree: bool = True, last: bool = False) -> None:
    """Blocks until a background save has finished and every process's part of it is sealed.

    Bounded: a failed part ends every process's wait (see the class). With ``agree`` every
    process exchanges its outcome, so all take the same decision: go on (sealed, or a failure
    to retry at the next save) or raise CheckpointSaveError / CheckpointSaveInterrupted. A
    caller on its way out of an error passes ``agree=False`` (the others may never come); one
    after which no save follows (the end of the run, a stop) passes ``last`` (no retry left).
    """
    if self._sealer is None:
      return
    step = self._sealing_step
    outcome = self._join(step)
    outcomes = [outcome]
    if agree and self.num_processes > 1:
      outcomes = agreement.gather(f"saved-{step}", outcome, timeout_s=self.save_timeout_s)
    self._sealer, self._sealing_step = None, None
    failed_in_a_row = self.failed_saves + 1 if any(outcomes) else 0
    verdict = save_outcome.decide(
      outcomes, failed_in_a_row=failed_in_a_row, retries=self.save_retries, last=last
    )
    self.failed_saves = failed_in_a_row
    if verdict.action == "ok":
      return
    latest = [s for s in self.all_steps() if s != step]
    latest = max(latest) if latest else "none"
    if verdict.action == "retry":
      self.retried_saves += 1
      log.warning(
        "saving the checkpoint of step %d failed (%s); failure %d of at most %d in a row: the "
        "next save tries again, training goes on (latest complete checkpoint: %s)",
        step,
        verdict.where,
        self.failed_saves,
        self.save_retries,
        latest,
      )
      return
    self._failed = True
    if verdict.action == "interrupted":
      self._abandoned = True
      raise CheckpointSaveInterrupted(
        f"a stop was asked for while the checkpoint of step {step} was being saved under "
        f"{self.directory}, and the save did not end within {GRACE_AFTER_STOP_S:.0f} s: it was "
        f"given up. The latest complete checkpoint is step {latest}; rerun the same command to "
        f"resume from it."
      )
    why = f" ({verdict.why})" if verdict.why else ""
    raise CheckpointSaveError(
      f"saving the checkpoint of step {step} under {self.directory} failed on {verdict.where}"
      f"{why}. Older checkpoints are intact (latest: {latest}); fix the cause (free disk space? "
      f"permissions?) and rerun the same command to resume."
    )

  def wait_on_error(self, timeout_s: float = 30.0) -> None:
    """On the way out of another error: lets this process's save end (within ``timeout_s``),
    never waits for the other processes and never raises (the error in flight is the news)."""
    if self.local is not None:
      self.local.wait()
    if self._sealer is None:
      return
    self._sealer.join(timeout_s)
    if self._sealer.is_alive():
      self._abandoned = True
      log.warning("gave up waiting for the save of step %s (on the way out)", self._sealing_step)
      return
    try:
      self.wait(agree=False)
    except LoomError as e:
      log.warning("%s", e)

  def _join(self, step: int) -> str:
    """This process's outcome of the save of ``step``: "" if sealed, else what went wrong."""
    grace_ends = peer_failed_at = None
    while self._sealer.is_alive():
      self._sealer.join(0.2)
      if self.num_processes > 1 and self._sealer.is_alive():
        if peer_failed_at is None and self._abort_reason():
          peer_failed_at = time.monotonic()
        if peer_failed_at is not None and time.monotonic() > peer_failed_at + PEER_GRACE_S:
          self._abandoned = True
          return save_outcome.PEER_STUCK
      if grace_ends is None and self._sealer.is_alive() and self._stop_requested():
        grace_ends = time.monotonic() + GRACE_AFTER_STOP_S
        log.warning(
          "stop requested while step %d is being saved: waiting up to %.0f s for the save",
          step,
          GRACE_AFTER_STOP_S,
        )
      if grace_ends is not None and time.monotonic() > grace_ends and self._sealer.is_alive():
        self._abandoned = True  # Orbax's threads leave their barriers; nobody joins them
        return f"{save_outcome.UNFINISHED} after {GRACE_AFTER_STOP_S:.0f} s of grace"
    error, self._sealer_error = self._sealer_error, None
    if error is None:
      return ""
    if isinstance(error, _OwnPartFailed):
      return save_outcome.describe(error.__context__ or error)  # what failed before Orbax's barrier
    if isinstance(error, agreement.BarrierAborted):
      return save_outcome.PEER
    return save_outcome.describe(error)

  def quarantine(self, step: int, reason: str) -> str:
    """Moves a bad checkpoint aside (never deletes it) so the run can go on without it.

    Process 0 moves it; every process waits for the move, then re-reads the step list."""
    stamp = agreement.from_main("quarantine-stamp", time.strftime("%Y%m%d-%H%M%S"))
    target = storage.absolute(self.directory).parent / "checkpoints_corrupt" / f"{step}-{stamp}"
    if self.is_main:
      # On object stores, Orbax's commit marker goes first: a move cut short leaves no step
      # that looks complete.
      storage.move_tree(
        storage.absolute(self.step_dir(step)), target, first=("commit_success.txt",)
      )
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
    return self._agreed(f"verified-{step}", problems)

  def _agreed(self, name: str, problems: list[str]) -> list[str]:
    """Every process's problems, on every process: a checkpoint one process cannot read is
    moved aside by all or by none, never used by some while process 0 moves it."""
    if self.num_processes == 1:
      return problems
    everyone = agreement.gather(name, json.dumps(problems))
    # Each once: an unsealed step's missing items are every process's finding.
    return list(dict.fromkeys(problem for answer in everyone for problem in json.loads(answer)))

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
        quarantined = storage.absolute(self.directory).parent / "checkpoints_corrupt"
        if quarantined.is_dir() and any(quarantined.iterdir()):
          # An earlier start moved every checkpoint aside: starting over would rewrite the
          # run's metrics from step 0. The user decides.
          raise CheckpointCorruptError(
            f"{self.directory} has no checkpoint left: an earlier start moved them all to "
            f"{quarantined} (each with its REASON.txt). To train this run from step 0, move "
            "that folder away; or start in a new --workdir"
          )
        return None
      step_dir = self.step_dir(step)
      problems = self._problems(step, verify_checksums)
      if not problems:
        try:
          metadata = self.metadata(step)
        except Exception as e:  # noqa: BLE001 - any unreadable metadata means a bad checkpoint
          problems = [f"{step_dir}: metadata unreadable ({type(e).__name__}: {e})"]
        problems = self._agreed(f"metadata-{step}", problems)
      if not problems:
        check_metadata(metadata)  # a mismatch is the user's decision, not corruption: raise
        try:
          state = self.restore(step, abstract_state)
        except Exception as e:
          if "tree structures do not match" in str(e):  # another run's state: not corruption
            raise CheckpointMismatchError(
              f"the checkpoint at {step_dir} holds a train state of another structure than this "
              f"run's ({STATE_PARTS_HINT}; or another optimizer). Use a new --workdir"
            ) from e
          if not _is_format_failure(e):
            raise
          problems = [f"{step_dir}: restore failed ({type(e).__name__}: {str(e)[:300]})"]
        problems = self._agreed(f"restored-{step}", problems)
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
    if self.local is not None:
      self.local.close()
    if self._abandoned or self._failed or self.failed_saves:
      # Orbax's threads of a given-up save may still be running (never wait for them), and a
      # failed one would be raised and logged again; the process is ending with its error.
      return
    try:
      self.wait()
    finally:
      self._manager.close()


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
  if isinstance(error, (MemoryError, TimeoutError, ConnectionError, PermissionError)):
    return False
  text = str(error).lower()
  not_the_files = (
    "shape",
    "out of memory",
    "resource_exhausted",
    "deadline",
    "timed out",
    "timeout",
    # The store refused or could not serve the read (what TensorStore and gcsfs say once their
    # own retries are spent): the files may be sound.
    "unavailable",
    "internal error",
    "internal:",
    "gateway",
    "permission",
    "forbidden",
    "unauthenticated",
    "unauthorized",
    "too many requests",
    "connection",
  )
  if any(word in text for word in not_the_files):
    return False
  return not re.search(r"\b(?:429|500|502|503|504)\b", text)  # HTTP statuses of the store


# Why two runs' train states differ in their parts (train/state.py, train/programs.py).
STATE_PARTS_HINT = (
  "a frozen reference copy is kept by DPO (not SimPO) and by GRPO with rl.kl_coef > 0, both "
  "without LoRA"
)


def check_compatible(
  saved: dict[str, Any], current: dict[str, Any], *, path: str, allow_mismatch: bool
) -> list[str]:
  """Compares the saved and current data fingerprint and model config.

  Returns the differences found (for the log). Raises CheckpointMismatchError unless
  ``allow_mismatch``; a model whose shapes differ fails at restore regardless.
  """
  saved_items, items = saved.get("state_items"), current.get("state_items")
  if saved_items is not None and items is not None and list(saved_items) != list(items):
    raise CheckpointMismatchError(  # allow_mismatch cannot restore parts that are not there
      f"the checkpoint in {path} holds a train state of other parts ({', '.join(saved_items)}) "
      f"than this run's ({', '.join(items)}): {STATE_PARTS_HINT}. Use a new --workdir (with "
      "--config.checkpoint.init_from=loom:<this run> to start from its weights)"
    )
  problems = []
  if saved.get("data_fingerprint") != current["data_fingerprint"]:
    problems.append(
      f"data fingerprint {saved.get('data_fingerprint')!r} in the checkpoint, "
      f"{current['data_fingerprint']!r} now"
    )
  # The data position is step x global batch, in the order the seed draws: another batch size
  # would skip or repeat part of an epoch, another seed reorder it mid-way.
  saved_config, config = saved.get("config") or {}, current.get("config") or {}
  for section, key, effect in (("train", "batch_size", "skip or repeat"), ("", "seed", "reorder")):
    before = (saved_config.get(section) or {}).get(key) if section else saved_config.get(key)
    now = (config.get(section) or {}).get(key) if section else config.get(key)
    if before is not None and now is not None and before != now:
      name = f"{section}.{key}" if section else key
      problems.append(
        f"{name}={before!r} in the checkpoint, {now!r} now (the data position is step x batch "
        f"size in the seed's order: this would {effect} part of the data)"
      )
  # Checkpoints from before a model field existed hold that field's default.
  fields = dataclasses.fields(ModelConfig)
  defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
  saved_model = {**defaults, **saved.get("model_config", {})}
  current_model = current["model_config"]

  def same(a: Any, b: Any) -> bool:  # JSON gives lists where the config holds tuples
    return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)

  for key in sorted((set(saved_model) | set(current_model)) - set(SCHEDULE_FIELDS)):
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


def restore_params(
  manager: ocp.CheckpointManager, step: int, abstract_params: Any, item: str = "params"
) -> Any:
  """Only the parameters of ``step`` (any subset of them), in ``abstract_params``' shardings;
  ``item="reference"``: a preference run's frozen reference weights instead."""
  abstract = {item: abstract_params}
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
  return restored["state"][item]
