"""The local tier: frequent checkpoints to each host's own disk, a replica of each on one peer.

Persistent checkpoints (``manager.py``: the work directory, often ``gs://``) cost enough that runs
save them every 30-60 minutes; a failure then throws away half of that on every chip. The local
tier saves every ``checkpoint.local_every`` steps to ``checkpoint.local_dir`` (a RAM disk or local
SSD of each host): each process writes its own shards (``local_files.py``) on a thread beside the
steps, and sends a copy to the next process (``peers.py``), so a host that is replaced loses
nothing. A restart restores from the newest step that is complete across the cluster in either
tier, agreed by every process (``restore_newest``); the persistent tier stays the ground truth
for everything else (another layout, a lost cluster, evaluation and export).

Why not Orbax's emergency checkpoint managers: they find a shard's second copy on another
replica of the data-parallel axis (a slice holding the whole state), where Loom's FSDP state has
no second copy, and they own the persistent tier, where Loom's has its seals and its bounded
handling of failed saves. The local tier needs neither Orbax's cross-process barriers nor a
shared directory: each process writes alone, so a full or failing local disk costs a warning,
never the run.

Layout under ``local_dir/run_<id>/process_<p>/`` (the run's id: ``WORKDIR/local_tier_id``):
``own/step_<N>``, ``replica_of_<q>/step_<N>`` (the copies kept for process ``q``), ``corrupt/``
(steps whose seal failed, moved aside, never deleted). At most ``checkpoint.local_keep`` steps are
kept in each. Runs sharing a ``local_dir`` never touch each other's steps; a run that finishes
removes its own (``release``), so only interrupted runs' steps stay. Nothing is written, the id
file in the work directory included, before the run's first local save: a run refused at its
start leaves both places as they were.
"""

from __future__ import annotations

import errno
import json
import logging
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from input_pipeline.host import agreement, storage
from train.checkpoint import local_files, peers

log = logging.getLogger("loom")

GRACE_S = 15.0  # what a local save in flight is given once the run is asked to stop
_PERMANENT = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM)


class LocalTier:
  """One process's local tier. Every method but the write thread's runs on the training thread,
  in the same order on every process (the agreements are collective)."""

  def __init__(
    self,
    root: str,
    run_id: str,
    *,
    every: int,
    keep: int,
    replicas: int,
    signature: str,
    id_file: Any = None,
    timeout_s: float = 1200.0,
    stop_requested: Callable[[], bool] = lambda: False,
  ):
    self.process, self.num_processes = jax.process_index(), jax.process_count()
    self.root = Path(root).expanduser().absolute()
    self.dir = self.root / f"run_{run_id}" / f"process_{self.process}"
    self.id_file = id_file  # WORKDIR/local_tier_id, written by process 0 at the first save
    self.own = self.dir / "own"
    self.run_id, self.signature = run_id, signature
    self.every, self.keep = every, keep
    self.replicas = min(replicas, 1) if self.num_processes > 1 else 0
    self.enabled = True
    # A local save that outlasts timeout_s (a hung disk, a peer that neither takes nor refuses
    # the replica) is given up, and the tier with it; after a stop request, GRACE_S.
    self.timeout_s, self._stop_requested = float(timeout_s), stop_requested
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._writing: int | None = None
    self._space_checked = False
    self._buffers: list | None = None  # host memory of the last snapshot (one state's shards)
    self.stats = {"saves": 0, "blocking_s": 0.0, "write_s": 0.0, "replica_s": 0.0, "bytes": 0}
    self.stats["failed_saves"] = 0
    local_files.remove_unfinished(self.own)
    for held in self.dir.glob("replica_of_*"):
      local_files.remove_unfinished(held)
    self.service = (
      peers.PeerService(self.dir, run_id, keep, quarantine=self.quarantine)
      if self.replicas
      else None
    )
    self.addresses = peers.exchange_addresses(self.service) if self.replicas else []

  @property
  def successor(self) -> int:
    return (self.process + 1) % self.num_processes

  def due(self, step: int) -> bool:
    """The same steps on every process, whether or not this process's tier is still on (a full
    disk turns off one process's): the loop checks the step's health before a local save, and
    processes that did so at different steps would roll back at different steps."""
    return self.every > 0 and step % self.every == 0

  # --- saving -------------------------------------------------------------------------------

  def save(self, step: int, state: Any, metadata: dict[str, Any]) -> None:
    """Copies this process's shards to host memory (the only part on the training thread), then
    writes and replicates them on a thread. The previous local save is finished first."""
    self.wait()
    if not self.enabled:
      return
    start = time.perf_counter()
    extra = {"run_id": self.run_id, "signature": self.signature, "process": self.process}
    extra |= {"num_processes": self.num_processes, "metadata": metadata}
    snap = local_files.snapshot(step, state, extra, self._buffers)
    self._buffers = snap.arrays  # reused by the next save, once this one is written
    if not self._space_checked and not self._enough_space(snap.nbytes):
      return
    self.stats["blocking_s"] += time.perf_counter() - start
    self._writing = step
    self._thread = threading.Thread(
      target=self._write, args=(snap,), name=f"loom-local-{step}", daemon=True
    )
    self._thread.start()

  def _enough_space(self, nbytes: int) -> bool:
    """Makes the run's directory and its id file at the first save, and checks that the local
    disk holds ``local_keep`` steps of this process and of the peer it keeps a replica for; if
    not, the tier is turned off."""
    self._space_checked = True
    try:
      self.dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      self.enabled = False  # restores still take part (and find nothing here)
      log.warning(
        "local checkpoint tier off on process %d: checkpoint.local_dir=%s cannot be made (%s); "
        "training goes on with the persistent tier",
        self.process,
        self.root,
        e,
      )
      return False
    if self.id_file is not None and self.process == 0 and not self.id_file.exists():
      storage.write_atomic(self.id_file, self.run_id)
    needed = nbytes * (1 + self.replicas) * self.keep
    usage = shutil.disk_usage(self.dir)
    held = local_files.bytes_under(self.dir)  # the peer service may be writing into it
    if usage.free + held >= needed:
      return True
    self.enabled = False
    log.warning(
      "local checkpoint tier off: %s has %.1f MB free, and %d steps of this process's shards "
      "(%.1f MB each)%s need %.1f MB; training goes on with the persistent tier only. Give "
      "checkpoint.local_dir more space or lower checkpoint.local_keep.",
      self.dir,
      usage.free / 1e6,
      self.keep,
      nbytes / 1e6,
      " and of a peer's replica" if self.replicas else "",
      needed / 1e6,
    )
    return False

  def _write(self, snap: local_files.Snapshot) -> None:
    try:
      start = time.perf_counter()
      local_files.prune(self.own, self.keep - 1, keep_step=snap.step)  # at most local_keep
      manifest = snap.manifest_bytes()
      local_files.write(self.own, snap.step, manifest, snap.chunks())
      self.stats["write_s"] += time.perf_counter() - start
      if self.replicas:
        start = time.perf_counter()
        address = self.addresses[self.successor]
        peers.send(
          address, self.run_id, self.process, snap.step, manifest, snap.chunks(), snap.nbytes
        )
        self.stats["replica_s"] += time.perf_counter() - start
      self.stats["saves"] += 1
      self.stats["bytes"] += snap.nbytes
    except BaseException as e:  # noqa: BLE001 - reported on the training thread by wait()
      self._error = e

  def wait(self) -> None:
    """Finishes the local save in flight. A failure is a warning, never the run's end: the
    persistent tier still holds the run; a full disk or lost permissions turn the tier off."""
    if self._thread is None:
      return
    began = time.monotonic()
    deadline = began + self.timeout_s
    while self._thread.is_alive() and time.monotonic() < deadline:
      if self._stop_requested():
        deadline = min(deadline, time.monotonic() + GRACE_S)
      self._thread.join(0.1)
    thread, self._thread, step = self._thread, None, self._writing
    if thread.is_alive():  # left to itself (a daemon thread); nothing more is written here
      self.enabled = False
      self.stats["failed_saves"] += 1
      self._buffers = None  # the thread may still read them
      log.warning(
        "local checkpoint tier: saving step %s on process %d had not ended after %.0f s of "
        "waiting; the local tier is off for the rest of this run; the persistent tier goes on",
        step,
        self.process,
        time.monotonic() - began,
      )
      return
    error, self._error = self._error, None
    if error is None:
      return
    self.stats["failed_saves"] += 1
    permanent = isinstance(error, OSError) and error.errno in _PERMANENT
    if permanent:
      self.enabled = False
    log.warning(
      "local checkpoint tier: saving step %s on process %d failed (%s: %s); %s",
      step,
      self.process,
      type(error).__name__,
      error,
      "the local tier is off for the rest of this run; the persistent tier goes on"
      if permanent
      else "the next local save tries again",
    )

  def discard_after(self, step: int) -> None:
    """Removes local steps newer than ``step``: after a restart from ``step`` the run saves them
    again (left, an incomplete one would outlive newer saves in the pruning by age); after a
    rollback they are another trajectory."""
    self.wait()
    for directory in [self.own, *self.dir.glob("replica_of_*")]:
      for newer in local_files.steps(directory):
        if newer > step:
          shutil.rmtree(local_files.step_dir(directory, newer), ignore_errors=True)

  def close(self) -> None:
    self.wait()
    if self.service is not None:
      self.service.close()

  def release(self) -> None:
    """Removes this process's steps and the replicas it holds, once the run has finished (its
    last step is persistent): a RAM disk shared by many runs is not filled by finished ones.
    The copies moved to ``corrupt/`` stay."""
    for directory in [self.own, *self.dir.glob("replica_of_*")]:
      shutil.rmtree(directory, ignore_errors=True)

  # --- restoring ----------------------------------------------------------------------------

  def _usable(self, directory: Path) -> list[int]:
    """Steps in ``directory`` written by this run on this layout."""
    found = []
    for step in local_files.steps(directory):
      try:
        manifest = local_files.read_manifest(local_files.step_dir(directory, step))
      except (OSError, ValueError):
        found.append(step)  # unreadable: verification will quarantine it
        continue
      if (manifest.get("run_id"), manifest.get("signature")) == (self.run_id, self.signature):
        found.append(step)
    return found

  def _inventory(self) -> dict[str, Any]:
    held = {}
    # Without replicas (local_replicas=0) there is no peer service to fetch from: a replica left
    # by an earlier attempt run with them is not offered.
    for directory in self.dir.glob("replica_of_*") if self.replicas else []:
      held[directory.name.removeprefix("replica_of_")] = self._usable(directory)
    return {"own": self._usable(self.own), "held": held}

  def quarantine(self, directory: Path, step: int, reason: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = self.dir / "corrupt" / f"{directory.name}-step_{step}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    local_files.step_dir(directory, step).rename(target)
    (target / "REASON.txt").write_text(reason + "\n")
    log.error("local checkpoint tier: moved step %d aside to %s: %s", step, target, reason)
    return target

  def restore_newest(
    self, abstract_state: Any, *, newer_than: int, check_metadata
  ) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest local step newer than ``newer_than`` (the persistent tier's latest) that every
    process holds, its own copy or its peer's replica; None if there is none.

    A process without its own copy fetches the replica from its holder first (restoring its
    local tier too); a copy whose seal fails is moved to ``corrupt/`` and the choice is made
    again, so a replica or the persistent tier takes its place. Returns (step, state, how:
    which processes' shards came from a peer, which copies were quarantined)."""
    quarantined: list[str] = []
    for _ in range(3):  # each round quarantines a copy or gives up
      mine = json.dumps(self._inventory())
      inventories = [json.loads(x) for x in agreement.gather("local-inventory", mine)]
      choice = _choose(inventories, newer_than)
      if choice is None:
        return None
      step, sources = choice
      problem = self._bring_own_copy(step, sources[self.process])
      answers = agreement.gather(f"local-verified-{step}", json.dumps(problem))
      problems = [json.loads(x) for x in answers]
      if not any(problems):
        path = local_files.step_dir(self.own, step)
        check_metadata(local_files.read_manifest(path)["metadata"])
        state = load_state(path, abstract_state)
        fetched = [p for p, source in enumerate(sources) if source != p]
        return step, state, {"from_peers": fetched, "quarantined": quarantined}
      quarantined += [p for p in problems if p]
    log.error("local checkpoint tier: no step could be restored; using the persistent tier")
    return None

  def _bring_own_copy(self, step: int, holder: int) -> str | None:
    """Makes sure ``own/step_<step>`` is here and sound; what went wrong otherwise."""
    try:
      if holder != self.process:
        start = time.perf_counter()
        nbytes = peers.fetch(
          self.addresses[holder], self.run_id, self.process, step, self.own, own=False
        )
        log.info(
          "local checkpoint tier: fetched this process's shards of step %d from process %d's "
          "replica (%.1f MB in %.2f s)",
          step,
          holder,
          nbytes / 1e6,
          time.perf_counter() - start,
        )
      problem = local_files.verify(local_files.step_dir(self.own, step))
    except (OSError, peers.PeerCopyError, ValueError) as e:
      return f"process {self.process}: step {step} from process {holder}: {e}"
    if problem:
      self.quarantine(self.own, step, problem)
      return f"process {self.process}: {problem}"
    return None


def id_file(workdir: str) -> Any:
  return storage.absolute(workdir) / "local_tier_id"


def run_id(workdir: str) -> str:
  """The run's id (``WORKDIR/local_tier_id``; a new one, which the first local save writes
  there, where it is absent): the run's folder of every local directory bears it, so runs that
  share one never restore, replace or delete each other's steps."""
  path = id_file(workdir)
  made = None
  if jax.process_index() == 0:
    made = path.read_text().strip() if path.exists() else secrets.token_hex(8)
  return agreement.from_main("local-tier-id", made)


def load_state(path: Path, abstract_state: Any) -> Any:
  return local_files.load(path, abstract_state)


def _choose(inventories: list[dict[str, Any]], newer_than: int) -> tuple[int, list[int]] | None:
  """The newest step every process can have, and where each process's shards come from (its
  own process index, or the process holding its replica); None if no step qualifies."""
  candidates = set()
  for inventory in inventories:
    candidates.update(inventory["own"], *inventory["held"].values())
  for step in sorted((s for s in candidates if s > newer_than), reverse=True):
    sources = []
    for process, inventory in enumerate(inventories):
      if step in inventory["own"]:
        sources.append(process)
        continue
      holders = [
        holder
        for holder, other in enumerate(inventories)
        if step in other["held"].get(str(process), [])
      ]
      if not holders:
        break
      sources.append(holders[0])
    else:
      return step, sources
  return None
