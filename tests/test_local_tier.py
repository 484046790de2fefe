"""The local checkpoint tier (train/checkpoint/local_tier.py): real processes killed between
persistent saves resume from their local disks, from a peer's replica when a host comes back
empty, from the persistent tier when both copies of a shard are gone; bit for bit each time."""

import json
import os
import shutil
import signal

import pytest
from cli_helpers import train_in_process
from cluster_helpers import DEVICES, launch, losses

from train.checkpoint import local_files, local_tier


def _inventory(own, **held) -> dict:
  return {"own": own, "held": {owner.removeprefix("of_"): steps for owner, steps in held.items()}}


def test_the_newest_step_every_process_can_have_wins():
  choose = local_tier._choose
  # Both hold their own 6 and 8: 8, each from itself.
  both = [_inventory([6, 8], of_1=[6, 8]), _inventory([6, 8], of_0=[6, 8])]
  assert choose(both, newer_than=-1) == (8, [0, 1])
  # Not newer than the persistent tier's latest: none.
  assert choose(both, newer_than=8) is None
  # Process 1 came back empty: its shards of 8 from process 0's replica.
  assert choose([_inventory([6, 8], of_1=[6, 8]), _inventory([])], -1) == (8, [0, 0])
  # Process 0's 8 is gone and its replica was on process 1, which lost everything: step 6 is
  # not complete either (process 1's 6 only on process 0, process 0's 6 nowhere): none.
  assert choose([_inventory([], of_1=[6, 8]), _inventory([])], -1) is None
  # Four processes, ring replicas (p keeps p-1's): process 2 lost both copies of its 6.
  four = [_inventory([2, 6], of_3=[2, 6]), _inventory([2, 6], of_0=[2, 6])]
  four += [_inventory([2]), _inventory([2, 6], of_2=[2])]
  assert choose(four, newer_than=-1) == (2, [0, 1, 2, 3])
  assert choose(four, newer_than=4) is None


def test_runs_sharing_a_local_directory_keep_their_own_steps(tmp_path):
  """Each run saves under its own folder (its id): another run's restart, saves and pruning
  never replace or delete its steps. The id file is written at the first save."""
  import jax.numpy as jnp

  state = {"w": jnp.arange(8.0)}

  def tier(run):
    return local_tier.LocalTier(
      str(tmp_path / "local"), run, every=2, keep=2, replicas=0, signature="s",
      id_file=tmp_path / f"{run}.id",
    )  # fmt: skip

  a, b = tier("a"), tier("b")
  assert not (tmp_path / "local").exists() and not (tmp_path / "a.id").exists()
  for step in (2, 4):
    a.save(step, state, {})
    a.wait()
  b.discard_after(0)  # b (re)starts from step 0
  for step in (2, 4, 6):
    b.save(step, state, {})
    b.wait()
  assert (_steps(a.own), _steps(b.own)) == ([2, 4], [4, 6])
  assert (tmp_path / "a.id").read_text() == "a" and a.own.parent.parent.name == "run_a"
  assert local_files.verify(local_files.step_dir(a.own, 2)) is None
  (local_files.step_dir(a.own, 2) / local_files.SEAL).write_text("[]")  # a seal of another shape
  assert "TypeError" in local_files.verify(local_files.step_dir(a.own, 2))  # quarantined, no crash
  a.quarantine(a.own, 2, "a seal of another shape")
  a.release()  # a finished: its steps go, what was moved aside stays; b's are untouched
  assert _steps(a.own) == [] and len(os.listdir(a.dir / "corrupt")) == 1
  assert _steps(b.own) == [4, 6]
  # A replica left by an earlier attempt with local_replicas > 0 is not offered now that there
  # is no peer service to fetch it from (it indexed the empty address list).
  shutil.copytree(b.own, b.dir / "replica_of_1")
  assert b._inventory() == {"own": [4, 6], "held": {}}
  # A tier turned off on one process (a full disk) keeps the run's schedule of local steps.
  b.enabled = False
  assert b.due(8) and not b.due(7)
  b.save(8, state, {})
  b.wait()
  assert _steps(b.own) == [4, 6]


def test_the_space_check_counts_what_stays_while_a_peer_writes_beside_it(tmp_path, monkeypatch):
  """The first local save sums the bytes already under its process's directory while the peer
  service may be renaming a replica's temporary step into place there: a two-process run had died
  of FileNotFoundError in that walk (the directory listed, then gone before it was read). What is
  gone by the time it is read is not counted."""
  own = tmp_path / "own" / "step_2"
  own.mkdir(parents=True)
  (own / "data").write_bytes(b"x" * 100)
  moving = tmp_path / "replica_of_1" / "tmp-step_2.123"
  moving.mkdir(parents=True)
  (moving / "data").write_bytes(b"y" * 50)
  scandir = os.scandir

  def renamed_just_before(path="."):
    if os.fspath(path) == str(moving):  # the peer service finishes its write now
      os.rename(moving, moving.parent / "step_2")
    return scandir(path)

  monkeypatch.setattr(os, "scandir", renamed_just_before)
  assert local_files.bytes_under(tmp_path) == 100
  monkeypatch.undo()
  assert local_files.bytes_under(tmp_path) == 150  # once it is in place


def test_a_local_save_that_hangs_is_given_up_in_bounded_time(tmp_path, monkeypatch):
  """A hung local disk (or a peer that never answers) had held the training thread at the next
  save, and a stopping run at its exit, for ever."""
  import threading
  import time

  import jax.numpy as jnp

  release = threading.Event()
  monkeypatch.setattr(local_files, "write", lambda *args: release.wait(60))
  stop = threading.Event()
  tier = local_tier.LocalTier(
    str(tmp_path / "local"), "r", every=2, keep=2, replicas=0, signature="s", timeout_s=30,
    stop_requested=stop.is_set,
  )  # fmt: skip
  monkeypatch.setattr(local_tier, "GRACE_S", 0.3)
  tier.save(2, {"w": jnp.arange(8.0)}, {})
  stop.set()  # a preemption notice: the grace period, not the 30 s, bounds the wait
  start = time.monotonic()
  tier.close()
  assert time.monotonic() - start < 5
  assert not tier.enabled and tier.stats["failed_saves"] == 1
  release.set()


def _local_flags(local, *more) -> tuple[str, ...]:
  return (f"--config.checkpoint.local_dir={local}", "--config.checkpoint.local_every=2", *more)


def _steps(path) -> list[int]:
  return local_files.steps(path)


def _run_dir(local, workdir):
  """The run's folder of a local directory (named by WORKDIR/local_tier_id)."""
  with open(os.path.join(workdir, "local_tier_id")) as f:
    return local / f"run_{f.read().strip()}"


def _report(workdir) -> dict:
  with open(os.path.join(workdir, "report.json")) as f:
    return json.load(f)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_killed_resume_from_local_disks_and_a_peers_replica(
  two_process_run, tmp_path, cache_dir
):
  reference = losses(two_process_run[0])  # the same two-process run, never interrupted
  workdir, local = str(tmp_path / "run"), tmp_path / "local"
  flags = _local_flags(local, "--config.checkpoint.every=0")  # persistent only at the end
  killed = (-signal.SIGKILL, -signal.SIGABRT)  # see the four-process test
  kill = (*flags, "--config.debug.kill_at_step=8")
  launch(workdir, 2, DEVICES, cache_dir, extra=kill, expect=killed)
  local = _run_dir(local, workdir)
  for p in (0, 1):  # each process's own steps, and a replica of each on the other
    assert _steps(local / f"process_{p}" / "own") == [6, 8]
    assert _steps(local / f"process_{p}" / f"replica_of_{1 - p}") == [6, 8]
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "8"))

  # Process 1's host is replaced (its local disk comes back empty), and process 0's own copy of
  # step 8 is corrupt: step 8 has no sound copy of process 0's shards left (their replica was on
  # the lost host), so the run resumes from step 6, process 1's shards from process 0's replica.
  shutil.rmtree(local / "process_1")
  with open(local / "process_0" / "own" / "step_8" / local_files.DATA, "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))
  outputs = launch(workdir, 2, DEVICES, cache_dir, extra=flags)
  assert "resumed from the local tier" in outputs[0] and "at step 6" in outputs[0], outputs[0]
  report = _report(workdir)
  restored = report["restored_from"]
  assert (restored["tier"], restored["step"], restored["from_peers"]) == ("local", 6, [1])
  assert "step_8" in restored["quarantined"][0]
  assert len(os.listdir(local / "process_0" / "corrupt")) == 1  # moved aside, never deleted
  # Bit for bit the uninterrupted run; 2 steps redone where the persistent tier alone (nothing
  # saved before the end) would have redone all 8.
  assert losses(workdir) == reference
  assert (report["goodput"]["redone_steps"], report["goodput"]["restored_from"]) == (2, "local")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_three_processes_a_lost_shard_falls_back_to_the_persistent_tier(tmp_path, cache_dir):
  """Killed at step 6 (persistent step 4, local steps 2 and 6). Three processes keep their
  replicas in a ring (p keeps p-1's: 0 keeps 2's, 1 keeps 0's, 2 keeps 1's), so no process holds
  everyone's. One copy: a host replaced, its shards from its peer; the other copy: both copies of
  one process's shards gone, the persistent tier. Both resumes give the same losses, bit for bit,
  the local one redoing fewer steps. (A model whose sizes 3 divides, a batch of 6: fsdp=3.)"""
  flags = _local_flags(
    tmp_path / "local",
    "--config.checkpoint.every=4",
    "--config.train.steps=10",
    "--config.train.batch_size=6",
    "--config.model.d_model=48",
    "--config.model.mlp_dim=96",
  )
  workdir = str(tmp_path / "run")
  # Each process SIGKILLs itself once every save is complete; one still returning from that
  # barrier may first see a peer's death and abort (-6): dead at step 6 either way.
  killed = (-signal.SIGKILL, -signal.SIGABRT)
  launch(workdir, 3, 1, cache_dir, extra=(*flags, "--config.debug.kill_at_step=6"), expect=killed)
  tier = _run_dir(tmp_path / "local", workdir)
  for p, kept in ((0, 2), (1, 0), (2, 1)):  # the ring
    assert _steps(tier / f"process_{p}" / "own") == [2, 6]
    assert _steps(tier / f"process_{p}" / f"replica_of_{kept}") == [2, 6]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
  shutil.copytree(workdir, tmp_path / "other")
  shutil.copytree(tmp_path / "local", tmp_path / "other_local")

  shutil.rmtree(tier / "process_1")  # its replica is on process 2
  launch(workdir, 3, 1, cache_dir, extra=flags)
  other_tier = _run_dir(tmp_path / "other_local", workdir)
  shutil.rmtree(other_tier / "process_2" / "own")
  shutil.rmtree(other_tier / "process_0" / "replica_of_2")
  other = str(tmp_path / "other")
  other_flags = _local_flags(tmp_path / "other_local", *flags[2:])
  outputs = launch(other, 3, 1, cache_dir, extra=other_flags)
  assert "at step 4" in outputs[0] and "local tier" not in outputs[0].split("resumed")[1][:40]

  local, persistent = _report(workdir), _report(other)
  assert local["restored_from"] == {
    "tier": "local",
    "step": 6,
    "from_peers": [1],
    "quarantined": [],
  }
  assert persistent["restored_from"] == {"tier": "persistent", "step": 4}
  assert losses(workdir) == losses(other)
  assert sorted(losses(workdir)) == list(range(1, 11))
  assert (local["goodput"]["redone_steps"], persistent["goodput"]["redone_steps"]) == (0, 2)


def test_a_full_local_disk_turns_the_tier_off_with_a_warning(tmp_path, cache_dir, caplog):
  import subprocess

  mount = tmp_path / "small_disk"
  mount.mkdir()
  made = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
  )
  assert made.returncode == 0, f"tmpfs mount needs root: {made.stderr}"
  try:
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(mount / "filler", "wb") as f:
      f.write(b"\0" * (free - 200_000))  # less than two steps of the tiny model's state
    overrides = {"train.steps": 6, "checkpoint.local_dir": str(mount / "local")}
    overrides |= {"checkpoint.local_every": 2, "checkpoint.every": 0, "train.eval_every": 0}
    with caplog.at_level("WARNING", logger="loom"):
      report = train_in_process(tmp_path / "run", cache_dir, overrides)
    assert "local checkpoint tier off" in caplog.text and "MB free" in caplog.text
    assert report["local_tier"]["enabled"] is False and report["local_tier"]["saves"] == 0
    assert report["steps"] == 6.0  # training went on; the persistent tier saved the end
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "6")
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)
