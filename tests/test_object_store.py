"""Work directories and data caches on an object store, against a real GCS API.

A GCS emulator (gcp-storage-emulator, in the [test] extra, with GCS's generation preconditions:
tests/gcs_emulator.py) runs on 127.0.0.1 for this module; Loom reaches it through the standard
STORAGE_EMULATOR_HOST variable (input_pipeline/host/settings.py translates it for TensorStore and
gcsfs). The end-to-end test trains with two jax.distributed processes on ``gs://`` paths
through a failed save and its retry, SIGKILLs both mid-run, resumes to a save that fails for good,
resumes again, and checks the losses bit for bit against the same run on local disk (the
session's two-process run, conftest.py); then the other commands work on that work directory.
"""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import fork_server
import pytest
from cluster_helpers import DEVICES, REPO, SETTINGS, STEPS, free_port, losses

KILL_AFTER = 10  # SIGKILL once the checkpoint of this step is sealed by both processes
# Refused uploads of the end-to-end test's work directory (gs://loom/pod/run): process 1's part
# of step 5 once with 400 (a store's error that may pass), process 0's part of the final step
# once with 403 (a permission withdrawn: it will not pass).
REFUSED_LOG = []  # the emulator's list of the uploads it refused
REFUSALS = (
  r"pod/run/checkpoints/5/state/ocdbt\.process_1/:400:1",
  rf"pod/run/checkpoints/{STEPS}/state/ocdbt\.process_0/:403:1",
)


def _serve(directory, *args: str) -> tuple[str, subprocess.Popen]:
  """Starts tests/gcs_emulator.py (``args``: its fault options); (its address, the process)."""
  port = free_port()
  log = open(os.path.join(directory, "emulator.log"), "w")  # noqa: SIM115 - the child's output
  proc = subprocess.Popen(
    [sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(port), *args],
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  log.close()
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert proc.poll() is None and time.monotonic() < deadline, "the GCS emulator did not start"
      time.sleep(0.2)
  return f"http://127.0.0.1:{port}", proc


def _object(host: str, name: str) -> str:
  """The text of object ``name`` of the bucket ``loom`` on the emulator at ``host`` ("" if none)."""
  url = f"{host}/download/storage/v1/b/loom/o/{urllib.parse.quote(name, safe='')}?alt=media"
  try:
    with urllib.request.urlopen(url, timeout=10) as response:
      return response.read().decode()
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return ""
    raise


def _stop(proc: subprocess.Popen) -> None:
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """STORAGE_EMULATOR_HOST of a fresh in-memory GCS emulator with the bucket ``loom``."""
  directory = tmp_path_factory.mktemp("emulator")
  faults = [arg for spec in REFUSALS for arg in ("--fail", spec)]
  host, proc = _serve(directory, *faults, "--fail-log", str(directory / "refused.txt"))
  REFUSED_LOG.append(directory / "refused.txt")
  saved = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = host
  from input_pipeline.host import settings

  # This process reads the results back through gcsfs (not imported before this module).
  added = settings.object_store_variables()
  yield host
  for key in added:
    os.environ.pop(key, None)
  if saved is None:
    os.environ.pop("STORAGE_EMULATOR_HOST", None)
  else:
    os.environ["STORAGE_EMULATOR_HOST"] = saved
  _stop(proc)


def _env(emulator: str | None, devices: int, scratch: str) -> dict:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    LOOM_LOCAL_SCRATCH=scratch,
  )
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  # What this process derived from its own emulator's address must not reach another emulator.
  derived = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")
  for name in derived:
    env.pop(name, None)
  if emulator:
    env["STORAGE_EMULATOR_HOST"] = emulator
  return env


def _start(workdir: str, cache: str, logs: str, emulator: str | None, processes: int = 2):
  """``python -m train`` as ``processes`` processes of DEVICES fake devices, as the session's
  two-process run; (procs, log paths)."""
  port = free_port()
  # The settings of the session's two-process run on local disk, the reference.
  overrides = {**SETTINGS, "data.cache_dir": cache}
  procs, paths = [], []
  for i in range(processes):
    cmd = [sys.executable, "-m", "train", f"--workdir={workdir}", "--config=configs/tiny.py"]
    cmd += [f"--config.{key}={value}" for key, value in overrides.items()]
    cmd += [
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={processes}",
      f"--process_id={i}",
    ]
    # Each process has its own local scratch space, as separate hosts would.
    env = _env(emulator, DEVICES, f"{logs}.scratch{i}")
    paths.append(f"{logs}.{len(os.listdir(os.path.dirname(logs)))}.{i}.log")
    with open(paths[-1], "w") as out:
      procs.append(
        fork_server.spawn(
          cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
      )
  return procs, paths


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def _wait(procs, timeout: float, ended: dict | None = None) -> float:
  """Waits for every process to end (at most ``timeout``); returns the seconds waited.
  ``ended`` receives each process's end, in seconds after the start of the wait."""
  start = time.monotonic()
  ended = {} if ended is None else ended
  while len(ended) < len(procs) and time.monotonic() - start < timeout:
    for i, p in enumerate(procs):
      if i not in ended and p.poll() is not None:
        ended[i] = round(time.monotonic() - start, 1)
    time.sleep(0.1)
  return time.monotonic() - start


def _finish(procs, paths, timeout: float = 300) -> list[str]:
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.returncode not in (None, 0) for p in procs):
        break
      time.sleep(0.2)
  finally:
    _kill(procs)
  outputs = [open(path).read() for path in paths]
  codes = [p.returncode for p in procs]
  assert codes == [0] * len(procs), f"exit codes {codes}\n" + "\n".join(
    f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs)
  )
  return outputs


def _losses(text: str) -> dict[int, float]:
  records = [json.loads(line) for line in text.splitlines()]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert len(steps) == len(set(steps)), f"duplicated metric lines: {steps}"
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _command(args: list[str], emulator: str, scratch: str) -> subprocess.CompletedProcess:
  return fork_server.run(
    [sys.executable, "-m", *args],
    cwd=REPO,
    env=_env(emulator, 8, scratch),
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_paths_and_atomic_writes_on_the_emulator(emulator):
  from etils import epath

  from input_pipeline.host import storage
  from train import metrics_writer

  root = storage.absolute("gs://loom/unit/")
  assert os.fspath(root) == "gs://loom/unit"
  storage.write_atomic(root / "a.json", '{"x": 1}')
  storage.write_atomic(root / "a.json", '{"x": 2}')  # replaced whole
  assert json.loads((root / "a.json").read_text()) == {"x": 2}
  # A resumed writer keeps the lines up to its step, drops later and torn ones, and appends.
  (root / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')
  writer = metrics_writer.MetricsWriter(root, resume_step=2, tensorboard=True, enabled=True)
  writer.write(3, {"train/loss": 1.5})
  writer.flush()
  lines = (root / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
  writer.write(4, {"train/loss": 1.25})
  writer.close()
  assert len((root / "metrics.jsonl").read_text().splitlines()) == 4
  events = list(epath.Path(root / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and events[0].stat().length > 0
  # train.evaluate beside a live run adds its line to the object; the run's next upload (from
  # memory) had dropped it.
  log = storage.AppendOnlyLog(root / "live.jsonl", ['{"step": 1}'], upload_every=3600)
  log.append('{"step": 2}')
  log.flush()
  storage.append_lines(root / "live.jsonl", ['{"harness": 2}'])
  log.append('{"step": 3}')
  log.close()
  lines = (root / "live.jsonl").read_text().splitlines()
  assert lines == ['{"step": 1}', '{"step": 2}', '{"harness": 2}', '{"step": 3}']


def test_checkpoint_checksums_on_gcs_are_the_stores_own(emulator, tmp_path):
  from input_pipeline.host import storage
  from train.checkpoint import integrity

  data = os.urandom(3 << 20)
  (tmp_path / "shard").write_bytes(data)
  remote = storage.absolute("gs://loom/unit/shard")
  remote.write_bytes(data)
  # Read from the object's metadata (the CRC32C GCS computed on upload), equal to the bytes'.
  assert integrity.checksum(remote) == integrity.checksum(storage.absolute(tmp_path / "shard"))
  remote.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  assert (
    integrity.checksum(remote)[1] != integrity.checksum(storage.absolute(tmp_path / "shard"))[1]
  )


def test_a_corrupt_checkpoint_on_gcs_is_moved_aside_and_the_previous_one_restored(emulator):
  """Object stores cannot rename: the quarantine copies the step beside the run, deletes it
  (its commit marker first) and the restore falls back to the step before."""
  import fsspec
  import jax
  import jax.numpy as jnp

  from input_pipeline.host import storage
  from train.checkpoint import manager

  root = storage.absolute("gs://loom/quarantine")
  ckpt = manager.Checkpointer(f"{root}/checkpoints", max_to_keep=3, async_save=False)
  try:
    for step in (1, 2):
      ckpt.save(step, {"w": jnp.full(64, float(step))}, {"config": {}})
    ckpt.wait()
    fs, inner = fsspec.core.url_to_fs(f"{root}/checkpoints/2")
    data = [p for p in sorted(fs.find(inner)) if "/d/" in p][0]  # an OCDBT data file
    data = storage.absolute(f"gs://{data}")
    blob = data.read_bytes()
    data.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    abstract = {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}
    step, state = ckpt.restore_latest_good(
      abstract, verify_checksums=True, check_metadata=lambda _: None
    )
    assert step == 1 and float(state["w"][0]) == 1.0
    assert ckpt.all_steps() == [1]
  finally:
    ckpt.close()
  (moved,) = list((root / "checkpoints_corrupt").iterdir())
  assert moved.name.startswith("2-") and "checkpoints/2" in (moved / "REASON.txt").read_text()
  assert (moved / "commit_success.txt").exists() and not (root / "checkpoints" / "2").exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_on_gcs_retry_a_failed_save_stop_at_a_lasting_one_and_resume_exactly(
  emulator, tmp_path, two_process_run, capsys
):
  """Two processes train on gs:// while the store refuses one process's part of two saves
  (REFUSALS), and the run is SIGKILLed once on the way; every loss equals the uninterrupted
  run's on local disk (the session's), bit for bit.

  - Step 5's save (400, may pass): both processes log the failure and train on; the save of step
    10 is its retry. Both are SIGKILLed once step 10 is sealed.
  - The resume reaches the final step, whose save will not pass (403): both stop with exit 4 and
    one line naming the step, the process and the cause, at once (not at Orbax's 20-minute
    barrier timeout, where they sat before).
  - A second resume starts from step 15 and finishes.
  Then the offline commands work on that work directory."""
  from etils import epath

  from train import report as report_command
  from train.checkpoint.__main__ import main as verify_command

  logs = str(tmp_path / "logs" / "run")
  os.makedirs(os.path.dirname(logs))
  # The reference: the same two-process run on local disk, never interrupted (the session's).
  reference = losses(two_process_run[0])
  assert sorted(reference) == list(range(1, STEPS + 1))

  workdir, cache = "gs://loom/pod/run", "gs://loom/pod/cache"
  started = time.monotonic()
  procs, paths = _start(workdir, cache, logs, emulator)
  sealed = epath.Path(f"{workdir}/checkpoints/{KILL_AFTER}")
  try:
    deadline = time.monotonic() + 300
    while len(list(sealed.glob("loom_checksums.*-of-2.json"))) < 2 if sealed.exists() else True:
      assert all(p.poll() is None for p in procs), "a process ended before it could be killed"
      assert time.monotonic() < deadline, "no sealed checkpoint of step 10 within 300 s"
      time.sleep(0.05)
  finally:
    _kill(procs)
  first = [open(path).read() for path in paths]
  assert "Prepared store gs://loom/pod/cache/stores/" in first[0]
  for output in first:
    # The retry, on every process, naming the process whose part failed.
    assert re.search(r"saving the checkpoint of step 5 failed \(process 1: .*400", output), output
    assert "failure 1 of at most 2 in a row: the next save tries again" in output
  # Process 1 prepared nothing and copied nothing (no TFDS build, no store in its scratch
  # space): it waited, then read its rows from the emulator. Process 0 built the TFDS dataset.
  scratch1 = f"{logs}.scratch1"
  assert not os.path.exists(scratch1) or not [f for _, _, fs in os.walk(scratch1) for f in fs]
  (scratch0,) = os.listdir(f"{logs}.scratch0")
  assert "tfds" in os.listdir(os.path.join(f"{logs}.scratch0", scratch0))
  done_before_kill = max(_losses(epath.Path(f"{workdir}/metrics.jsonl").read_text()))
  assert KILL_AFTER <= done_before_kill < STEPS, done_before_kill
  checkpoints = epath.Path(f"{workdir}/checkpoints")
  assert not (checkpoints / "5" / "commit_success.txt").exists()  # never finalised

  procs, paths = _start(workdir, cache, logs, emulator)
  waited = _wait(procs, 300)
  outputs = [open(path).read() for path in paths]
  codes = [p.returncode for p in procs]
  _kill(procs)
  assert codes == [4, 4], f"exit codes {codes} after {waited:.0f} s\n" + "\n".join(
    f"--- process {i}:\n{out[-4000:]}" for i, out in enumerate(outputs)
  )
  # From step 10, or 15 where that was sealed too before the kill landed.
  assert re.search(rf"resumed from {workdir}/checkpoints at step (10|15)\b", outputs[0])
  refused = REFUSED_LOG[0].read_text().splitlines()
  assert [line.split()[0] for line in refused] == ["400", "403"], refused
  for output in outputs:
    # The stop: one line with the step, the process and the cause.
    (line,) = [x for x in output.splitlines() if x.startswith("loom: error: saving")]
    assert "failed on process 0: " in line and "PERMISSION_DENIED" in line.upper(), line
    assert "latest: 15" in line
  assert (checkpoints / "15" / "commit_success.txt").exists()
  assert not (checkpoints / str(STEPS) / "commit_success.txt").exists()  # not a step

  outputs = _finish(*_start(workdir, cache, logs, emulator))
  wall = time.monotonic() - started
  assert f"resumed from {workdir}/checkpoints at step 15" in outputs[0]
  for output in outputs:  # the shared store is reused
    assert "Prepared store" not in output
  resumed = _losses(epath.Path(f"{workdir}/metrics.jsonl").read_text())
  assert resumed == reference  # every step, bit for bit (some twice: the last is kept)
  print(f"two processes on the emulator, with a kill, a stop and two resumes: {wall:.1f} s wall")

  # The store process 0 of two put on the emulator is byte for byte the one a single process
  # prepares ahead of a run (python -m input_pipeline.prepare) into a fresh local cache.
  remote_stores = list(epath.Path(f"{cache}/stores").iterdir())
  assert len(remote_stores) == 1
  remote_manifest = json.loads((remote_stores[0] / "manifest.json").read_text())
  single = str(tmp_path / "single_process_cache")
  prepared = _command(
    ["input_pipeline.prepare", "--config=configs/tiny.py", f"--config.data.cache_dir={single}"],
    None,
    str(tmp_path / "prepare"),
  )
  assert prepared.returncode == 0, prepared.stderr[-2000:]
  assert json.loads(prepared.stdout.splitlines()[-1])["fingerprint"] == remote_stores[0].name
  with open(os.path.join(single, "stores", remote_stores[0].name, "manifest.json")) as f:
    local_manifest = json.load(f)
  assert remote_manifest["arrays"] == local_manifest["arrays"]
  for name, meta in remote_manifest["arrays"].items():
    data = (remote_stores[0] / name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == meta["sha256"], name

  # The offline commands on the gs:// work directory, in this process (its environment points
  # at the emulator); generation as a command of its own.
  capsys.readouterr()
  assert verify_command(["train.checkpoint", "verify", workdir]) == 0
  assert f"step {STEPS}: ok" in capsys.readouterr().out
  assert report_command.main(["train.report", workdir]) == 0
  assert epath.Path(f"{workdir}/report.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads(epath.Path(f"{workdir}/report.json").read_text())["tokens"] > 0
  generated = _command(
    ["train.generate", f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=4", "--json"],
    emulator,
    str(tmp_path / "commands"),
  )
  assert generated.returncode == 0, generated.stderr[-2000:]
  assert len(json.loads(generated.stdout.strip().splitlines()[-1])["texts"]) == 1


READER = """
import json, sys
from configs.default import get_config
import input_pipeline
c = get_config()
c.data.cache_dir, c.data.source, c.data.seq_len = sys.argv[1], sys.argv[2], 32
c.data.store_shard_mb = 0.01
pipe = input_pipeline.build(c)
process, steps = int(sys.argv[3]), 6
batches = pipe.train_batches(global_batch_size=16, start_step=0, process_index=process,
                             process_count=2)
rows = 0
for _ in range(steps):
  rows += len(next(batches)["inputs"])
manifest = pipe.manifest
import numpy as np
firsts = [m for n, m in manifest["arrays"].items() if n.startswith("train_") and ".00000." in n]
row_bytes = sum(m["shape"][1] * np.dtype(m["dtype"]).itemsize for m in firsts)
print(json.dumps({"bytes_read": pipe.store.bytes_read, "rows": rows, "row_bytes": row_bytes,
                  "shards": len(manifest["shards"]["train"])}))
"""


def test_two_processes_read_only_their_rows_of_a_sharded_store_on_gcs(emulator, tmp_path):
  """A store written in shards to the emulator is read by 2 processes, each fetching its own
  rows by byte ranges: no more than 2x its share of the bytes, and no copy of the store."""
  import sysconfig

  import input_pipeline
  from configs.default import get_config

  source = "files:" + os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py")
  cache = "gs://loom/sharded-cache"
  config = get_config()
  config.data.cache_dir, config.data.source, config.data.seq_len = cache, source, 32
  config.data.store_shard_mb = 0.01
  prepared = input_pipeline.build(config)  # writes the shards and the manifest to the emulator
  total = sum((prepared.store.path / name).stat().length for name in prepared.manifest["arrays"])
  results = []
  for process in (0, 1):
    scratch = str(tmp_path / f"scratch{process}")
    out = subprocess.run(
      [sys.executable, "-c", READER, cache, source, str(process)],
      cwd=REPO, env=_env(emulator, 1, scratch), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    # Nothing of the store was copied to this host.
    assert not list((tmp_path / f"scratch{process}").glob("**/*.npy"))
  for result in results:
    share = result["rows"] * result["row_bytes"]
    assert result["rows"] == 6 * 8 and result["shards"] > 5
    assert 0 < result["bytes_read"] <= 2 * share, result
  assert sum(r["bytes_read"] for r in results) < total / 4


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_during_a_save_that_hangs_ends_every_process_within_30_s(tmp_path):
  """The store answers 503 to every upload of process 1's part of step 10: the client retries
  for many minutes, the save hangs, the processes train on and wait for it at the next save.
  SIGTERM (a preemption) then ends both within 30 s, with exit 75 and the latest complete
  checkpoint named (step 5)."""
  store = tmp_path / "store"
  store.mkdir()
  refused = store / "refused.txt"
  hold = r"pod/hung/checkpoints/10/state/ocdbt\.process_1/:503:0"
  host, server = _serve(store, "--fail", hold, "--fail-log", str(refused))
  logs = str(tmp_path / "logs" / "run")
  os.makedirs(os.path.dirname(logs))
  try:
    procs, paths = _start("gs://loom/pod/hung", "gs://loom/pod/hung-cache", logs, host)
    try:
      deadline = time.monotonic() + 300
      while not refused.exists():
        assert all(p.poll() is None for p in procs), "a process ended before its save hung"
        assert time.monotonic() < deadline, "the upload to hold never came"
        time.sleep(0.2)
      # The processes train on to step 15, write its metrics before its save, and wait there for
      # step 10's save (a fixed 10 s sleep before).
      while '"step": 15' not in _object(host, "pod/hung/metrics.jsonl"):
        assert all(p.poll() is None for p in procs), "a process ended before step 15"
        assert time.monotonic() < deadline, "no metrics of step 15 within 300 s"
        time.sleep(0.2)
      time.sleep(1)
      assert all(p.poll() is None for p in procs)
      signalled = time.strftime("%H:%M:%S")
      for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
      ended = {}
      waited = _wait(procs, 60, ended)
      codes = [p.returncode for p in procs]
    finally:
      _kill(procs)
  finally:
    _stop(server)
  outputs = [open(path).read() for path in paths]
  shown = "\n".join(f"--- process {i}:\n{out[-8000:]}" for i, out in enumerate(outputs))
  assert codes == [75, 75] and waited < 30, (
    f"exit codes {codes}; SIGTERM at {signalled}, processes ended {ended} s later\n{shown}"
  )
  for output in outputs:
    assert "while the checkpoint of step 10 was being saved" in output, output[-3000:]
    assert "The latest complete checkpoint is step 5" in output
  print(f"SIGTERM during a hung save: both processes ended {waited:.1f} s later")
