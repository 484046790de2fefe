"""Preemption, crashes, corruption, divergence and full disks never lose work."""

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time

import fork_server
import jax
import numpy as np
import pytest
from cli_helpers import REPO, read_metrics, run_train, train_command, train_env, train_losses

from train import metrics_writer as metrics
from train.checkpoint import integrity


@pytest.fixture(scope="module")
def reference(tiny_reference):
  """An uninterrupted 20-step run that logs every step and checkpoints at 10 and 20 (the
  session's, conftest.py; the tests below change only copies of it)."""
  return tiny_reference


def _copy_without(reference, tmp_path, name, *steps):
  copy = str(tmp_path / name)
  shutil.copytree(reference, copy)
  for step in steps:
    shutil.rmtree(os.path.join(copy, "checkpoints", str(step)))
  return copy


def _wait_for_steps(workdir, steps, process, timeout=120, finished_ok=False):
  """Waits until metrics.jsonl has ``steps`` lines; False if the run finished first (when ok)."""
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    if finished_ok and process.poll() == 0:
      return False
    assert process.poll() is None, process.stderr.read()[-3000:]
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) >= steps:
          return True
    time.sleep(0.05)
  raise AssertionError(f"no {steps} logged steps within {timeout}s")


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits(tmp_path, cache_dir):
  workdir = str(tmp_path / "w")
  overrides = (
    "--config.train.steps=100000",
    "--config.log.every=1",
    "--config.checkpoint.every=0",
    "--config.train.eval_every=0",
  )
  process = fork_server.spawn(
    train_command(workdir, *overrides, cache_dir=cache_dir),
    cwd=REPO,
    env=train_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  lines: list[str] = []

  def read_stderr() -> None:
    for line in process.stderr:
      lines.append(line)

  reader = threading.Thread(target=read_stderr)
  reader.start()
  try:
    _wait_for_steps(workdir, 10, process)
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    # The second signal once the first was handled: two signals pending at once are one to
    # Python (a slow step can hold the main thread while both arrive).
    while process.poll() is None and not any("SIGTERM received:" in x for x in list(lines)):
      assert time.time() < sent + 30, "the first SIGTERM was not handled within 30 s"
      time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # a second signal must not corrupt anything
    process.wait(timeout=60)
    elapsed = time.time() - sent
  finally:
    process.kill()
    reader.join(timeout=30)
  stderr = "".join(lines)
  assert process.returncode == 75, stderr[-3000:]
  assert elapsed < 30
  assert "SIGTERM received again" in stderr
  logged = max(r["step"] for r in read_metrics(workdir))
  steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  assert len(steps) == 1 and steps[0] >= logged
  assert f"stopped by SIGTERM at step {steps[0]}" in stderr
  lines, corrupt = integrity.verify_all(workdir)
  assert corrupt == 0 and lines == [f"step {steps[0]}: ok"]
  print(f"SIGTERM to exit: {elapsed:.2f}s at step {steps[0]}")
  # The next run resumes exactly there.
  result = run_train(
    workdir, f"--config.train.steps={steps[0] + 2}", "--config.log.every=1", cache_dir=cache_dir
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"at step {steps[0]}" in result.stderr


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_bounded_and_the_health_is_logged(
  reference, tmp_path, cache_dir
):
  """One run with two non-finite steps (3 and 4) checks the skips, their count and the health
  logged around them; a second run with four in a row stops at the limit."""
  workdir = str(tmp_path / "a")
  result = run_train(
    workdir, "--config.debug.nan_steps=(3, 4)", "--config.log.every=1", cache_dir=cache_dir
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 3 skipped (non-finite loss or gradients)" in result.stderr
  report = json.load(open(tmp_path / "a" / "report.json"))
  assert report["skipped_nonfinite"] == 2
  assert np.isfinite(report["train/loss"]) and np.isfinite(report["eval/loss"])
  events = [r for r in read_metrics(workdir) if "event" in r]
  assert [r["step"] for r in events] == [3, 4]

  # The health in the logs: the applied learning rate, per-layer norms, tokens and goodput.
  lines = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r and "event" not in r}
  expected = {r["step"]: r for r in read_metrics(reference) if "train/learning_rate" in r}
  # A skipped step applies no update; the optimizer's schedule does not advance past it.
  assert lines[3]["train/learning_rate"] == lines[4]["train/learning_rate"] == 0.0
  assert lines[5]["train/learning_rate"] == pytest.approx(expected[3]["train/learning_rate"])
  assert lines[2]["train/learning_rate"] == pytest.approx(expected[2]["train/learning_rate"])
  assert lines[20]["train/tokens_seen"] == 20 * 8 * 32  # steps × batch × seq_len
  # Per-layer norms (two layers, embedding, final norm) add up to the global gradient norm.
  grads = {k: v for k, v in lines[5].items() if k.startswith("grad_norm/")}
  assert {"grad_norm/layer_0", "grad_norm/layer_1", "grad_norm/embed"} <= grads.keys()
  total = np.sqrt(sum(v**2 for v in grads.values()))
  assert total == pytest.approx(lines[5]["train/grad_norm"], rel=1e-4)
  assert lines[3]["update_norm/layer_0"] == 0.0 and lines[5]["update_norm/layer_0"] > 0
  goodput = report["goodput"]
  assert 0 < goodput["goodput"] <= 1 and goodput["redone_steps"] == 0
  accounted = goodput["productive_s"] + sum(goodput["lost_s"].values())
  assert accounted == pytest.approx(goodput["wall_s"], rel=0.02)
  assert {"compile", "checkpoint", "input_wait", "eval", "restore_or_init", "data"} <= goodput[
    "lost_s"
  ].keys()

  result = run_train(
    str(tmp_path / "b"),
    "--config.debug.nan_steps=(3, 4, 5, 6)",
    "--config.train.max_consecutive_skips=3",
    cache_dir=cache_dir,
  )
  assert result.returncode == 3, result.stderr[-3000:]
  assert "training diverged: 3 consecutive steps skipped up to step 5" in result.stderr


@pytest.mark.slow
def test_loss_spike_rolls_back_and_skips_the_data_window(tmp_path, cache_dir):
  workdir = str(tmp_path / "w")
  result = run_train(
    workdir,
    "--config.debug.spike_steps=(14,)",
    "--config.log.every=1",
    "--config.train.spike_policy=rollback",
    "--config.train.spike_factor=1.5",
    "--config.checkpoint.every=5",
    cache_dir=cache_dir,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "rolled back to step 10 after a loss spike at step 14" in result.stderr
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert report["rollbacks"] == 1
  # Steps 11 .. (at least) 14 were thrown away with the rollback: their time is not productive.
  assert report["redone_steps"] >= 4 and report["goodput"]["redone_steps"] >= 4
  events = [r["event"] for r in read_metrics(workdir) if "event" in r]
  assert events == ["skipped: loss spike", "rollback"]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(reference, tmp_path, cache_dir):
  workdir = _copy_without(reference, tmp_path, "corrupt")
  data_files = [
    p
    for p in glob.glob(os.path.join(workdir, "checkpoints", "20", "state", "**"), recursive=True)
    if os.path.isfile(p) and "/d/" in p
  ]
  victim = max(data_files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.seek(os.path.getsize(victim) // 2)
    f.write(b"\x00garbage\x00")
  lines, corrupt = integrity.verify_all(workdir)
  assert corrupt == 1 and lines[0] == "step 10: ok" and victim in "\n".join(lines)
  verify = subprocess.run(
    ["python", "-m", "train.checkpoint", "verify", workdir],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert verify.returncode == 1 and "step 20: CORRUPT" in verify.stdout

  result = run_train(workdir, "--config.log.every=1", cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint at step 20 is corrupt" in result.stderr and victim in result.stderr
  assert "resumed" in result.stderr and "at step 10" in result.stderr
  assert train_losses(read_metrics(workdir)) == train_losses(read_metrics(reference))
  # Steps 11-20 ran before (their lines were in metrics.jsonl) and ran again: goodput lost.
  goodput = json.load(open(os.path.join(workdir, "report.json")))["goodput"]
  assert goodput["restarted_from_step"] == 10 and goodput["redone_steps"] == 10
  assert goodput["lost_s"]["redone_steps"] > 0 and goodput["productive_s"] >= 0
  moved = glob.glob(os.path.join(workdir, "checkpoints_corrupt", "20-*", "REASON.txt"))
  assert len(moved) == 1  # kept for inspection, not deleted
  assert integrity.verify_all(workdir)[1] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
  "devices, overrides",
  [
    (8, ("--config.mesh.fsdp=4", "--config.mesh.tensor=2")),
    (2, ()),
    (1, ()),
  ],
)
def test_resume_on_another_topology(reference, tmp_path, cache_dir, devices, overrides):
  workdir = _copy_without(reference, tmp_path, "topology", 20)
  result = run_train(
    workdir, "--config.log.every=1", *overrides, devices=devices, cache_dir=cache_dir
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "at step 10" in result.stderr
  expected, got = train_losses(read_metrics(reference)), train_losses(read_metrics(workdir))
  assert sorted(got) == sorted(expected)
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=2e-5
  )


@pytest.mark.slow
def test_full_disk_while_saving_keeps_the_previous_checkpoint(reference, tmp_path, cache_dir):
  mount = tmp_path / "small_disk"
  mount.mkdir()
  made = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True
  )
  assert made.returncode == 0, f"tmpfs mount needs root: {made.stderr}"
  try:
    # A run that has saved step 10 (the reference's, as it was then).
    workdir = _copy_without(reference, mount, "w", 20)
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    with open(mount / "filler", "wb") as f:
      f.write(b"\0" * (free - 40_000))
    result = run_train(workdir, "--config.train.steps=20", cache_dir=cache_dir)
    # Orbax's threads print much at exit after a failed save: show what names the failure.
    shown = [x for x in result.stderr.splitlines() if x.startswith(("loom", "Traceback", "E1"))]
    assert result.returncode == 4, "\n".join(shown[:40])
    assert "saving the checkpoint of step 20 " in result.stderr
    assert "No space left on device" in result.stderr
    assert "latest: 10" in result.stderr
    os.remove(mount / "filler")
    assert integrity.verify_all(workdir)[1] == 0
    result = run_train(workdir, "--config.train.steps=20", cache_dir=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 10" in result.stderr
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_config_file_without_get_config_is_refused(tmp_path, cache_dir):
  bad = tmp_path / "bad_config.py"
  bad.write_text("learning_rate = 3\n")
  result = run_train(str(tmp_path / "w"), cache_dir=cache_dir, config=str(bad))
  assert result.returncode != 0
  assert "get_config" in result.stderr


def test_metrics_file_drops_torn_and_future_lines_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(
    '{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/loss": 0.9}\n'
    '{"step": 15, "train/loss": 0.8}\n{"step": 20, "tr'
  )
  writer = metrics.MetricsWriter(str(tmp_path), resume_step=10, tensorboard=False, enabled=True)
  assert writer.last_logged_step == 15  # the torn line 20 says nothing
  writer.write(15, {"train/loss": 0.7})
  writer.close()
  assert [json.loads(line) for line in path.read_text().splitlines()] == [
    {"step": 5, "train/loss": 1.0},
    {"step": 10, "train/loss": 0.9},
    {"step": 15, "train/loss": 0.7},
  ]


def test_a_run_whose_checkpoints_were_all_moved_aside_is_not_started_over(tmp_path):
  """An earlier start quarantined every checkpoint (and said so, exit 2): the next start must
  not train from step 0 over the run's metrics without the user's say."""
  from train.checkpoint import manager

  (tmp_path / "checkpoints_corrupt" / "20-20261206-101500").mkdir(parents=True)
  ckpt = manager.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2, async_save=False)
  try:
    with pytest.raises(manager.CheckpointCorruptError, match="moved them all to .*checkpoints_co"):
      ckpt.restore_latest_good(None, verify_checksums=True, check_metadata=lambda _: None)
  finally:
    ckpt.close()
  (tmp_path / "checkpoints_corrupt" / "20-20261206-101500").rmdir()  # moved away: start over
  ckpt = manager.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2, async_save=False)
  try:
    assert ckpt.restore_latest_good(None, verify_checksums=True, check_metadata=None) is None
  finally:
    ckpt.close()


def test_a_store_that_refuses_a_read_is_not_taken_for_a_corrupt_checkpoint():
  """What TensorStore and gcsfs raise once their retries are spent leaves the checkpoint where
  it is (raised with its cause); undecodable files move it aside."""
  from train.checkpoint import manager

  assert manager._is_format_failure(ValueError("DATA_LOSS: Error decoding b-tree node"))
  assert manager._is_format_failure(FileNotFoundError("state/d/0a1b: no such object"))
  # A hash that holds a status's digits is no status.
  assert manager._is_format_failure(ValueError("DATA_LOSS: state/d/ce9500b3: bad b-tree node"))
  for error in (
    ValueError("UNAVAILABLE: Error reading gs://b/ckpt/state/d/0a1b: HTTP 503"),
    ValueError("PERMISSION_DENIED: 403 Forbidden"),
    OSError("429 Too Many Requests"),
    PermissionError("gs://b/ckpt"),
    ValueError("Error reading gs://b/ckpt/state/d/0a1b: 504 Gateway Timeout"),
    ValueError("INTERNAL: HTTP status 500"),
  ):
    assert not manager._is_format_failure(error), error


def test_a_resume_with_another_batch_size_or_seed_is_refused():
  """The data position is step x batch size in the seed's order: resuming with another would
  silently skip, repeat or reorder data. Refused unless checkpoint.allow_mismatch."""
  from train.checkpoint import manager

  model = {"d_model": 64}

  def meta(seed, batch_size):
    config = {"seed": seed, "train": {"batch_size": batch_size}}
    return {"config": config, "data_fingerprint": "f", "model_config": model}

  assert manager.check_compatible(meta(0, 8), meta(0, 8), path="p", allow_mismatch=False) == []
  with pytest.raises(
    manager.CheckpointMismatchError, match="train.batch_size=8 in the che.*16 now"
  ):
    manager.check_compatible(meta(0, 8), meta(0, 16), path="p", allow_mismatch=False)
  with pytest.raises(manager.CheckpointMismatchError, match="seed=0 in the checkpoint, 1 now"):
    manager.check_compatible(meta(0, 8), meta(1, 8), path="p", allow_mismatch=False)
  (problem,) = manager.check_compatible(meta(0, 8), meta(0, 4), path="p", allow_mismatch=True)
  assert "repeat" in problem


def test_a_checkpoint_of_another_state_structure_is_refused_not_quarantined(tmp_path):
  """A checkpoint from before the metadata named the state's parts, restored into a state with
  other parts (a DPO reference copy): a mismatch in one line, the checkpoint left in place."""
  import jax.numpy as jnp

  from train.checkpoint import manager

  ckpt = manager.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2, async_save=False)
  try:
    ckpt.save(1, {"params": {"w": jnp.ones(4)}}, {"config": {}})
    ckpt.wait()
    other = {"params": {"w": jnp.ones(4)}, "reference": {"w": jnp.ones(4)}}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), other)
    with pytest.raises(manager.CheckpointMismatchError, match="another structure"):
      ckpt.restore_latest_good(abstract, verify_checksums=True, check_metadata=lambda _: None)
  finally:
    ckpt.close()
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  assert not (tmp_path / "checkpoints_corrupt").exists()


@pytest.mark.slow
def test_chaos_sigkill_at_random_moments(tmp_path, cache_dir):
  """10 SIGKILLs during training and saves of both checkpoint tiers; the final run equals the
  uninterrupted one (which saves only persistent checkpoints)."""
  # 40 steps leave room for 10 kills; saves every 2 steps so that kills land mid-save too.
  total_steps = 40
  overrides = (
    f"--config.train.steps={total_steps}",
    "--config.log.every=1",
    "--config.checkpoint.every=2",
  )
  reference = str(tmp_path / "reference")
  result = run_train(reference, *overrides, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  workdir = str(tmp_path / "chaos")
  # The local tier saves the odd steps (the persistent tier the even ones).
  local = (f"--config.checkpoint.local_dir={tmp_path / 'local'}",)
  local += ("--config.checkpoint.local_every=1",)
  # The killed runs' system temporary directory: nothing of theirs is left there.
  (tmp_path / "tmp").mkdir()
  env = dict(train_env(), TMPDIR=str(tmp_path / "tmp"))
  rng = random.Random(0)
  kills = mid_save = attempts = local_resumes = 0
  redone = {"both tiers": 0, "persistent only": 0}  # steps each restart runs again

  def count_redone(stderr: str, logged: int, persistent: int) -> None:
    resumed = re.search(r"resumed from .* at step (\d+)", stderr)
    if resumed and logged:
      redone["both tiers"] += logged - int(resumed.group(1))
      redone["persistent only"] += logged - persistent

  def before_start() -> tuple[int, int]:
    """(last logged step, newest persistent checkpoint) as a restart finds them."""
    path, logged = os.path.join(workdir, "metrics.jsonl"), 0
    if os.path.exists(path):
      with open(path) as f:
        for line in f:  # a line torn by the kill is skipped (the restart drops it too)
          if '"train/loss"' in line and line.endswith("\n"):
            logged = max(logged, json.loads(line)["step"])
    saved = glob.glob(os.path.join(workdir, "checkpoints", "*"))
    names = [os.path.basename(p) for p in saved]
    return logged, max((int(n) for n in names if n.isdigit()), default=0)

  while kills < 10 and attempts < 20:
    attempts += 1
    found = before_start()
    process = fork_server.spawn(
      train_command(workdir, *overrides, *local, cache_dir=cache_dir),
      cwd=REPO,
      env=env,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    try:
      if attempts % 2:
        # Any moment of the first seconds: data, restore, compilation, first steps (a command
        # forked from tests/fork_server.py has its imports done and reaches them within ~1 s).
        time.sleep(rng.uniform(0.2, 2.5))
      else:
        # During training, right after a step was logged, often while a save is in flight.
        path = os.path.join(workdir, "metrics.jsonl")
        done = len(read_metrics(workdir)) if os.path.exists(path) else 0
        if not _wait_for_steps(workdir, done + 1, process, finished_ok=True):
          break  # the run completed before another kill could land
        time.sleep(rng.uniform(0.0, 0.1))
      if process.poll() is None:
        process.kill()
        kills += 1
        mid_save += bool(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))
        mid_save += bool(glob.glob(str(tmp_path / "local" / "*" / "process_0" / "own" / "tmp-*")))
    finally:
      process.kill()
      stderr = process.communicate()[1]
      local_resumes += "resumed from the local tier" in stderr
      count_redone(stderr, *found)
  found = before_start()
  result = run_train(workdir, *overrides, *local, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  local_resumes += "resumed from the local tier" in result.stderr
  count_redone(result.stderr, *found)
  print(
    f"chaos: {kills} kills survived, {mid_save} while a save was in progress; {local_resumes} "
    f"restarts resumed from the local tier; steps redone in all: {redone}"
  )
  assert redone["both tiers"] < redone["persistent only"]
  assert kills >= 10 and local_resumes >= 1
  assert os.listdir(tmp_path / "tmp") == []  # AutoGraph's files were left by each kill
  records = read_metrics(workdir)
  steps = [r["step"] for r in records if "train/loss" in r]
  assert steps == sorted(set(steps)), "duplicated or torn metric lines"
  assert train_losses(records) == train_losses(read_metrics(reference))
  assert integrity.verify_all(workdir)[1] == 0
  # Final parameters equal, bit for bit: compare the last checkpoints' arrays.
  import jax
  import orbax.checkpoint as ocp

  def final_params(run_dir):
    # Restored onto one device with an explicit target (Orbax warns, rightly, without one).
    path = os.path.join(run_dir, "checkpoints", str(total_steps), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
      checkpointer.metadata(path).item_metadata.tree,
    )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.PyTreeRestore(target, restore_args=restore_args)
    return checkpointer.restore(path, args=args)["params"]

  a, b = final_params(workdir), final_params(reference)

  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
