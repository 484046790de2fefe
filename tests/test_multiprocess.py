"""Multi-process runs: cluster detection (fake environments) and real jax.distributed training.

The real runs start ``python -m train`` processes on 127.0.0.1 (gloo CPU collectives), each with
its own fake CPU devices, and compare their per-step losses with one process holding all the
devices: the global batch, the data order and the math are the same, so only float summation
order may differ. A two-process checkpoint is then resumed by four processes (another device
count and mesh) and by one.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from input_pipeline.host import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10
SAVED_AT = 5
# Summation order differs between meshes (gloo vs in-process reductions): ~1e-6 seen.
LOSS_TOLERANCE = 1e-4


# --- cluster detection and explicit settings, with fake environments (no jax.distributed) ---


class FakeInitialize:
  def __init__(self, error: Exception | None = None):
    self.calls = []
    self.error = error

  def __call__(self, **kwargs):
    self.calls.append(kwargs)
    if self.error:
      raise self.error


SLURM_JOB = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_NODELIST": "gpu[001-004]",
  "SLURM_NTASKS": "4",
  "SLURM_PROCID": "2",
  "SLURM_LOCALID": "0",
}


def test_single_process_initialises_nothing():
  fake = FakeInitialize()
  assert not distributed.initialize(environ={}, tpu_vm=False, initialize_fn=fake)
  assert fake.calls == []


def test_explicit_flags_are_passed_through():
  fake = FakeInitialize()
  assert distributed.initialize(
    "127.0.0.1:1234", 2, 1, environ={}, tpu_vm=False, initialize_fn=fake
  )
  assert fake.calls == [
    {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  ]


def test_environment_settings_and_flags_win():
  fake = FakeInitialize()
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476",
    "JAX_NUM_PROCESSES": "4",
    "JAX_PROCESS_ID": "3",
  }
  assert distributed.initialize(environ=env, tpu_vm=False, initialize_fn=fake)
  assert distributed.initialize(process_id=0, environ=env, tpu_vm=False, initialize_fn=fake)
  assert fake.calls == [
    {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3},
    {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 0},
  ]


@pytest.mark.parametrize(
  "args, env, message",
  [
    (("127.0.0.1:1234", None, None), {}, "also pass --num_processes, --process_id"),
    ((None, 2, None), {}, "also pass --coordinator_address, --process_id"),
    (("127.0.0.1", 2, 0), {}, "must be HOST:PORT"),
    (("127.0.0.1:99999", 2, 0), {}, "must be HOST:PORT"),
    (("127.0.0.1:1234", 2, 2), {}, r"--process_id=2 must be in \[0, 2\)"),
    (("127.0.0.1:1234", 0, 0), {}, "--num_processes=0 must be at least 1"),
    ((None, None, None), {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an"),
    ((None, None, None), {"LOOM_DISTRIBUTED": "yes"}, "LOOM_DISTRIBUTED='yes' must be"),
  ],
)
def test_bad_settings_are_errors(args, env, message):
  fake = FakeInitialize()
  with pytest.raises(ValueError, match=message):
    distributed.initialize(*args, environ=env, tpu_vm=False, initialize_fn=fake)
  assert fake.calls == []


@pytest.mark.parametrize(
  "env, tpu_vm, expected",
  [
    (SLURM_JOB, False, "slurm"),
    ({**SLURM_JOB, "SLURM_NTASKS": "1"}, False, None),  # one task: nothing to join
    ({k: v for k, v in SLURM_JOB.items() if k != "SLURM_STEP_NODELIST"}, False, None),  # no srun
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1,t1k-2,t1k-3", "TPU_WORKER_ID": "1"}, True, "gke_tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False, None),
    (
      {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.9", "MEGASCALE_NUM_SLICES": "2"},
      True,
      "cloud_tpu_multislice",
    ),
    ({}, True, "cloud_tpu_vm"),
    ({}, False, None),
  ],
)
def test_cluster_detection(env, tpu_vm, expected):
  assert distributed.cluster_detected(env, tpu_vm=tpu_vm) == expected
  fake = FakeInitialize()
  assert distributed.initialize(environ=env, tpu_vm=tpu_vm, initialize_fn=fake) == bool(expected)
  # Detected clusters are left to JAX's own detection: no arguments.
  assert fake.calls == ([{}] if expected else [])


def test_detection_can_be_turned_off_but_explicit_settings_still_count():
  fake = FakeInitialize()
  env = {**SLURM_JOB, "LOOM_DISTRIBUTED": "off"}
  assert not distributed.initialize(environ=env, tpu_vm=True, initialize_fn=fake)
  assert distributed.initialize("h:1", 2, 0, environ=env, tpu_vm=True, initialize_fn=fake)
  assert len(fake.calls) == 1


def test_initialisation_failures_are_raised_with_context():
  fake = FakeInitialize(error=RuntimeError("connection refused"))
  with pytest.raises(RuntimeError, match=r"auto-detected slurm cluster.*connection refused"):
    distributed.initialize(environ=SLURM_JOB, tpu_vm=False, initialize_fn=fake)
  with pytest.raises(RuntimeError, match=r"process 1 of 2, coordinator h:9.*connection refused"):
    distributed.initialize("h:9", 2, 1, environ={}, tpu_vm=False, initialize_fn=fake)


# --- real processes on 127.0.0.1 ---


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Ten short steps, every loss logged, a checkpoint half way, eval only at the end.
SETTINGS = {
  "train.steps": STEPS,
  "checkpoint.every": SAVED_AT,
  "log.every": 1,
  "train.eval_every": 0,
  "log.progress": False,
}


def settings(cache_dir: str) -> dict:
  return {**SETTINGS, "data.cache_dir": cache_dir}


def overrides(cache_dir: str) -> list[str]:
  return [f"--config.{key}={value}" for key, value in settings(cache_dir).items()]


def process_env(devices: int) -> dict:
  """The environment of one process of a test cluster: CPU, ``devices`` fake devices, no
  cluster settings inherited (the flags give them)."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="2",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  return env


def launch(workdir: str, processes: int, devices: int, cache_dir: str, timeout: float = 240):
  """Runs ``python -m train`` as ``processes`` processes of ``devices`` fake CPU devices each.

  Returns each process's combined output. Kills every process (and its children) on a failure
  or when ``timeout`` runs out, so that a hung collective cannot hold the test suite.
  """
  port = free_port()
  env = process_env(devices)
  paths, procs = [], []
  try:
    for i in range(processes):
      cluster = (
        [
          f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={processes}",
          f"--process_id={i}",
        ]
        if processes > 1
        else []
      )
      cmd = [
        sys.executable,
        "-m",
        "train",
        f"--workdir={workdir}",
        "--config=configs/tiny.py",
        *overrides(cache_dir),
        *cluster,
      ]
      paths.append(f"{workdir}.{processes}x{devices}.{i}.log")
      with open(paths[-1], "w") as log:  # the child keeps its own copy of the descriptor
        procs.append(
          subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
          )
        )
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  outputs = []
  for path in paths:
    with open(path) as f:
      outputs.append(f.read())
  codes = [p.returncode for p in procs]
  assert codes == [0] * processes, (
    f"{processes} × {devices}: exit codes {codes} (negative = killed after {timeout}s)\n"
    + "\n".join(f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
  )
  return outputs


def losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records if "train/loss" in r]
  assert len(steps) == len(set(steps)), f"duplicate train records (two writers?): {steps}"
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def max_difference(a: dict[int, float], b: dict[int, float], steps) -> float:
  return max(abs(a[s] - b[s]) for s in steps)


def copy_at_saved_step(source: str, target: str) -> str:
  """The workdir as it was after the step-SAVED_AT checkpoint (later checkpoints removed)."""
  shutil.copytree(source, target)
  for name in os.listdir(os.path.join(target, "checkpoints")):
    if name.isdigit() and int(name) > SAVED_AT:
      shutil.rmtree(os.path.join(target, "checkpoints", name))
  return target


def tiny_config(cache_dir: str):
  from configs import tiny

  config = tiny.get_config()
  for key, value in settings(cache_dir).items():
    group, name = key.split(".")
    config[group][name] = value
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """One process, 8 devices, in this process; also prepares the shared data store once, so the
  processes started later only read it."""
  from train import trainer

  workdir = str(tmp_path_factory.mktemp("one_process"))
  trainer.train_and_evaluate(tiny_config(cache_dir), workdir)
  result = losses(workdir)
  assert sorted(result) == list(range(1, STEPS + 1))
  return result


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, cache_dir, reference):
  workdir = str(tmp_path_factory.mktemp("two_processes") / "run")
  outputs = launch(workdir, processes=2, devices=4, cache_dir=cache_dir)
  return workdir, outputs


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_like_one(two_process_run, reference):
  workdir, outputs = two_process_run
  assert "processes: 2 (this is 0); devices: 4 local, 8 global" in outputs[0]
  two = losses(workdir)  # also: one record per step, so only one process wrote
  assert sorted(two) == list(range(1, STEPS + 1))
  difference = max_difference(two, reference, two)
  assert difference < LOSS_TOLERANCE, (two, reference)
  print(f"max |loss(2 × 4) - loss(1 × 8)| = {difference:.2e}")
  assert os.path.exists(os.path.join(workdir, "report.json"))
  # Every process wrote its own shards of the checkpoint.
  state_dir = os.path.join(workdir, "checkpoints", str(SAVED_AT), "state")
  shards = sorted(name for name in os.listdir(state_dir) if name.startswith("ocdbt.process_"))
  assert shards == ["ocdbt.process_0", "ocdbt.process_1"], os.listdir(state_dir)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_four_processes_resume_a_two_process_checkpoint(
  two_process_run, reference, tmp_path, cache_dir
):
  # 4 processes × 1 device: another process count, device count and mesh (fsdp 8 -> 4).
  workdir = copy_at_saved_step(two_process_run[0], str(tmp_path / "run"))
  outputs = launch(workdir, processes=4, devices=1, cache_dir=cache_dir)
  assert f"at step {SAVED_AT}" in outputs[0] and "resumed from" in outputs[0]
  four = losses(workdir)
  assert sorted(four) == list(range(1, STEPS + 1))
  resumed = range(SAVED_AT + 1, STEPS + 1)
  difference = max_difference(four, reference, resumed)
  assert difference < LOSS_TOLERANCE, (four, reference)
  print(f"max |loss(4 × 1, resumed) - loss(1 × 8)| = {difference:.2e}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_one_process_resumes_a_two_process_checkpoint(
  two_process_run, reference, tmp_path, cache_dir
):
  from train import trainer

  workdir = copy_at_saved_step(two_process_run[0], str(tmp_path / "run"))
  report = trainer.train_and_evaluate(tiny_config(cache_dir), workdir)
  assert report["tokens"] == (STEPS - SAVED_AT) * 8 * 32  # only the remaining steps ran
  one = losses(workdir)
  difference = max_difference(one, reference, range(SAVED_AT + 1, STEPS + 1))
  assert difference < LOSS_TOLERANCE, (one, reference)


def run_command(module_args: list[str], processes: int, devices: int, timeout: float = 240):
  """``python -m MODULE ARGS`` as a jax.distributed cluster; (returncode, stdout, stderr) each."""
  port = free_port()
  env = process_env(devices)
  procs = []
  for i in range(processes):
    cluster = [
      f"--coordinator_address=127.0.0.1:{port}",
      f"--num_processes={processes}",
      f"--process_id={i}",
    ]
    procs.append(
      subprocess.Popen(
        [sys.executable, "-m", *module_args, *cluster],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
      )
    )
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      results.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  return results


def json_lines(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_generate_and_bench_run_as_two_processes(two_process_run):
  workdir, _ = two_process_run
  generate = ["train.generate", f"--workdir={workdir}", "--prompt=def ", "--greedy", "--json"]
  generate += ["--max_new_tokens=8"]
  (one,) = run_command(generate, processes=1, devices=8)
  assert one[0] == 0, one[2][-2000:]
  two = run_command(generate, processes=2, devices=4)
  assert [code for code, _, _ in two] == [0, 0], two[0][2][-2000:] + two[1][2][-2000:]
  assert json_lines(two[1][1]) == []  # process 0 alone prints
  assert json_lines(two[0][1])[-1]["texts"] == json_lines(one[1])[-1]["texts"]

  bench = ["train.bench", "--config=configs/tiny.py", "--steps=2", "--warmup=1"]
  two = run_command(bench, processes=2, devices=4)
  assert [code for code, _, _ in two] == [0, 0], two[0][2][-2000:] + two[1][2][-2000:]
  assert json_lines(two[1][1]) == []
  result = json_lines(two[0][1])[-1]
  assert result["processes"] == 2 and result["devices"] == 8 and result["tokens_per_second"] > 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_checkpoint_verify_shares_the_parts_between_processes(two_process_run, tmp_path):
  workdir = copy_at_saved_step(two_process_run[0], str(tmp_path / "run"))
  verify = ["train.checkpoint", "verify", workdir]
  results = run_command(verify, processes=2, devices=1, timeout=120)
  assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]
  assert f"step {SAVED_AT}: ok" in results[0][1] and "step" not in results[1][1]
  # Damage a shard that process 1 wrote: its part of the seal catches it, process 0 reports it.
  shard_dir = os.path.join(workdir, "checkpoints", str(SAVED_AT), "state", "ocdbt.process_1", "d")
  shard = os.path.join(shard_dir, sorted(os.listdir(shard_dir))[0])
  with open(shard, "r+b") as f:
    f.seek(0)
    byte = f.read(1)
    f.seek(0)
    f.write(bytes([byte[0] ^ 0xFF]))
  results = run_command(verify, processes=2, devices=1, timeout=120)
  assert [code for code, _, _ in results] == [1, 1]
  assert f"step {SAVED_AT}: CORRUPT" in results[0][1] and "checksum mismatch" in results[0][1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_harness_runs_as_two_processes_with_one_result(two_process_run):
  """Each process scores its rows of every batch; the result equals one process's."""
  workdir, _ = two_process_run
  tasks = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness_tasks")
  evaluate = ["train.evaluate", f"--workdir={workdir}", f"--include_path={tasks}", "--limit=8"]
  evaluate += ["--tasks=loom_python_mc,loom_python_text", "--batch_size=4"]
  (one,) = run_command(evaluate, processes=1, devices=8)
  assert one[0] == 0, one[2][-2000:]
  two = run_command(evaluate, processes=2, devices=4)
  assert [code for code, _, _ in two] == [0, 0], two[0][2][-2000:] + two[1][2][-2000:]
  assert json_lines(two[1][1]) == []  # process 0 alone prints (and writes)
  got, expected = json_lines(two[0][1])[-1], json_lines(one[1])[-1]
  assert got["processes"] == 2 and got["requests"] == expected["requests"]
  assert got["metrics"].keys() == expected["metrics"].keys()
  for name, value in expected["metrics"].items():
    assert got["metrics"][name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_prepare_one_store_in_parallel_byte_for_byte(tmp_path):
  """data.parallel_prepare: each process tokenizes its share of the documents, process 0 packs
  the shares; the store equals the one a single process prepares, file for file."""
  common = ["input_pipeline.prepare", "--config=configs/tiny.py"]
  common += ["--config.data.store_shard_mb=0.004"]  # several shards per split
  caches = {n: tmp_path / f"cache{n}" for n in (1, 2)}
  (one,) = run_command([*common, f"--config.data.cache_dir={caches[1]}"], processes=1, devices=1)
  assert one[0] == 0, one[2][-2000:]
  parallel = [*common, f"--config.data.cache_dir={caches[2]}"]
  parallel += ["--config.data.parallel_prepare=True"]
  two = run_command(parallel, processes=2, devices=1)
  assert [code for code, _, _ in two] == [0, 0], two[0][2][-2000:] + two[1][2][-2000:]
  for _, _, err in two:  # both processes tokenized documents of both splits
    (line,) = [x for x in err.splitlines() if "tokenized this process's share" in x]
    counts = re.findall(r"(train|validation) (\d+) documents", line)
    assert [split for split, _ in counts] == ["train", "validation"], line
    assert all(int(n) > 0 for _, n in counts), line
  assert json_lines(two[1][1]) == []  # process 0 alone prints
  result, reference = json_lines(two[0][1])[-1], json_lines(one[1])[-1]
  assert result["fingerprint"] == reference["fingerprint"] and result["processes"] == 2
  stores = {n: caches[n] / "stores" / reference["fingerprint"] for n in (1, 2)}
  names = sorted(os.listdir(stores[1]))
  assert names == sorted(os.listdir(stores[2])) and len(names) > 7, names
  for name in names:
    a, b = ((stores[n] / name).read_bytes() for n in (1, 2))
    if name == "manifest.json":
      a, b = ({k: v for k, v in json.loads(x).items() if k != "prepare_seconds"} for x in (a, b))
    assert a == b, name
  assert os.listdir(caches[2] / "stores") == [reference["fingerprint"]]  # shares removed
