"""Multi-process runs: cluster detection (fake environments) and real jax.distributed training.

The real runs start ``python -m train`` processes on 127.0.0.1 (gloo CPU collectives), each with
its own fake CPU devices (cluster_helpers.DEVICES), and compare their per-step losses with one
process holding 8 devices (the session's tiny reference run): the global batch, the data order
and the math are the same, so only float summation order may differ. The session's two-process
run (conftest.py) is then resumed by four processes (another device count and mesh) and by one.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from cli_helpers import copy_run, train_in_process
from cluster_helpers import (
  DEVICES,
  SAVED_AT,
  SETTINGS,
  STEPS,
  free_port,
  json_lines,
  launch,
  losses,
  process_env,
  run_command,
)

from input_pipeline.host import distributed

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


def max_difference(a: dict[int, float], b: dict[int, float], steps) -> float:
  return max(abs(a[s] - b[s]) for s in steps)


def copy_at_saved_step(source: str, target: str) -> str:
  """The workdir as it was after the step-SAVED_AT checkpoint (later checkpoints removed)."""
  shutil.copytree(source, target)
  for name in os.listdir(os.path.join(target, "checkpoints")):
    if name.isdigit() and int(name) > SAVED_AT:
      shutil.rmtree(os.path.join(target, "checkpoints", name))
  return target


@pytest.fixture(scope="module")
def reference(tiny_reference):
  """One process holding all 8 devices, every loss logged (the session's tiny reference run)."""
  result = losses(tiny_reference)
  assert sorted(result) == list(range(1, STEPS + 1))
  return result


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_like_one(two_process_run, reference):
  workdir, outputs = two_process_run
  assert f"processes: 2 (this is 0); devices: {DEVICES} local, {2 * DEVICES} global" in outputs[0]
  two = losses(workdir)  # also: one record per step, so only one process wrote
  assert sorted(two) == list(range(1, STEPS + 1))
  difference = max_difference(two, reference, two)
  assert difference < LOSS_TOLERANCE, (two, reference)
  print(f"max |loss(2 × {DEVICES}) - loss(1 × 8)| = {difference:.2e}")
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
  """4 processes × 1 device: another process count, device count and mesh (fsdp over both
  processes' devices -> two pipeline stages across processes × fsdp 2). The two processes of each
  stage pair read the same rows (input_pipeline.row_share): 4 rows each of the 8, two blocks for
  four processes."""
  workdir = copy_at_saved_step(two_process_run[0], str(tmp_path / "run"))
  stages = (
    "--config.mesh.dcn_stage=2",
    "--config.mesh.dcn_fsdp=2",
    "--config.pipeline.microbatches=2",
  )
  outputs = launch(workdir, processes=4, devices=1, cache_dir=cache_dir, extra=stages)
  assert f"at step {SAVED_AT}" in outputs[0] and "resumed from" in outputs[0]
  assert "mesh: stage=2 × data=1 × fsdp=2" in outputs[0] and "per process 4;" in outputs[0]
  assert "pipeline: 2 stages, 2 microbatches" in outputs[0]
  four = losses(workdir)
  assert sorted(four) == list(range(1, STEPS + 1))
  resumed = range(SAVED_AT + 1, STEPS + 1)
  difference = max_difference(four, reference, resumed)
  assert difference < LOSS_TOLERANCE, (four, reference)
  print(f"max |loss(4 × 1, resumed) - loss(1 × 8)| = {difference:.2e}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_context_axis_across_two_processes_resumes_a_two_process_checkpoint(
  two_process_run, reference, tmp_path, cache_dir
):
  """2 processes × 2 devices, each row's length split over a context axis across the processes
  (ring attention) × fsdp 2 within each: both processes read the same whole rows
  (input_pipeline.row_share) and each device takes its stretch of the length."""
  workdir = copy_at_saved_step(two_process_run[0], str(tmp_path / "run"))
  context = ("--config.mesh.dcn_context=2", "--config.model.attention_context=ring")
  outputs = launch(workdir, processes=2, devices=2, cache_dir=cache_dir, extra=context)
  assert f"at step {SAVED_AT}" in outputs[0] and "resumed from" in outputs[0]
  assert "fsdp=2 × context=2" in outputs[0] and "per process 8;" in outputs[0]
  two = losses(workdir)
  resumed = range(SAVED_AT + 1, STEPS + 1)
  difference = max_difference(two, reference, resumed)
  assert difference < LOSS_TOLERANCE, (two, reference)
  print(f"max |loss(2 × 2, context across processes) - loss(1 × 8)| = {difference:.2e}")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_one_process_resumes_a_two_process_checkpoint(
  two_process_run, reference, tmp_path, cache_dir
):
  workdir = copy_at_saved_step(two_process_run[0], str(tmp_path / "run"))
  report = train_in_process(workdir, cache_dir, SETTINGS)
  assert report["tokens"] == (STEPS - SAVED_AT) * 8 * 32  # only the remaining steps ran
  one = losses(workdir)
  difference = max_difference(one, reference, range(SAVED_AT + 1, STEPS + 1))
  assert difference < LOSS_TOLERANCE, (one, reference)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_generate_and_bench_run_as_two_processes(two_process_run):
  """Every process computes, process 0 alone prints; the texts equal one process's."""
  from train.inference import generation, loading

  workdir, _ = two_process_run
  generate = ["train.generate", f"--workdir={workdir}", "--prompt=def ", "--greedy", "--json"]
  generate += ["--max_new_tokens=8"]
  one = generation.generate(loading.load(workdir), ["def "], max_new_tokens=8, temperature=0.0)
  two = run_command(generate, processes=2, devices=DEVICES)
  assert [code for code, _, _ in two] == [0, 0], two[0][2][-2000:] + two[1][2][-2000:]
  assert json_lines(two[1][1]) == []  # process 0 alone prints
  assert json_lines(two[0][1])[-1]["texts"] == one.texts

  # The session's peak (--peak=given): each process's own readings, side by side on two cores,
  # would only measure each other.
  bench = ["train.bench", "--config=configs/tiny.py", "--steps=2", "--warmup=1", "--peak=given"]
  two = run_command(bench, processes=2, devices=DEVICES)
  assert [code for code, _, _ in two] == [0, 0], two[0][2][-2000:] + two[1][2][-2000:]
  assert json_lines(two[1][1]) == []
  result = json_lines(two[0][1])[-1]
  assert (
    result["processes"] == 2
    and result["devices"] == 2 * DEVICES
    and result["tokens_per_second"] > 0
    and result["peak_source"].startswith("given")
  )


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
def test_the_harness_runs_as_two_processes_with_one_result(two_process_run, tmp_path):
  """Each process scores its rows of every batch; the result equals one process's."""
  from train.inference import harness, loading

  workdir = copy_run(two_process_run[0], tmp_path / "run")  # the command writes eval/
  tasks = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness_tasks")
  names = ["loom_python_mc", "loom_python_text"]
  expected = harness.run_tasks(
    loading.load(workdir), names, include_path=tasks, limit=8, batch_size=4
  )
  evaluate = ["train.evaluate", f"--workdir={workdir}", f"--include_path={tasks}", "--limit=8"]
  evaluate += [f"--tasks={','.join(names)}", "--batch_size=4"]
  two = run_command(evaluate, processes=2, devices=DEVICES)
  assert [code for code, _, _ in two] == [0, 0], two[0][2][-2000:] + two[1][2][-2000:]
  assert json_lines(two[1][1]) == []  # process 0 alone prints (and writes)
  got = json_lines(two[0][1])[-1]
  assert got["processes"] == 2 and got["requests"] == expected["requests"]
  assert got["metrics"].keys() == expected["metrics"].keys()
  for name, value in expected["metrics"].items():
    assert got["metrics"][name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_prepare_one_store_in_parallel_byte_for_byte(tmp_path):
  """data.parallel_prepare: each process tokenizes its share of the documents, process 0 packs
  the shares; the store equals the one a single process prepares, file for file."""
  from cli_helpers import tiny_config

  import input_pipeline

  caches = {n: tmp_path / f"cache{n}" for n in (1, 2)}
  alone = input_pipeline.build(tiny_config(caches[1], {"data.store_shard_mb": 0.004}))
  parallel = ["input_pipeline.prepare", "--config=configs/tiny.py"]
  parallel += ["--config.data.store_shard_mb=0.004"]  # several shards per split
  parallel += [f"--config.data.cache_dir={caches[2]}", "--config.data.parallel_prepare=True"]
  two = run_command(parallel, processes=2, devices=1)
  assert [code for code, _, _ in two] == [0, 0], two[0][2][-2000:] + two[1][2][-2000:]
  for _, _, err in two:  # both processes tokenized documents of both splits
    (line,) = [x for x in err.splitlines() if "tokenized this process's share" in x]
    counts = re.findall(r"(train|validation) (\d+) documents", line)
    assert [split for split, _ in counts] == ["train", "validation"], line
    assert all(int(n) > 0 for _, n in counts), line
  assert json_lines(two[1][1]) == []  # process 0 alone prints
  result = json_lines(two[0][1])[-1]
  assert result["fingerprint"] == alone.fingerprint and result["processes"] == 2
  stores = {n: caches[n] / "stores" / alone.fingerprint for n in (1, 2)}
  names = sorted(os.listdir(stores[1]))
  assert names == sorted(os.listdir(stores[2])) and len(names) > 7, names
  for name in names:
    a, b = ((stores[n] / name).read_bytes() for n in (1, 2))
    if name == "manifest.json":
      a, b = ({k: v for k, v in json.loads(x).items() if k != "prepare_seconds"} for x in (a, b))
    assert a == b, name
  assert os.listdir(caches[2] / "stores") == [alone.fingerprint]  # shares removed


# Two processes leave after an outcome they agreed on but that is not orderly (a failed or given-up
# save): process 1 is still tearing down when process 0 is ready to exit.
LEAVING = """
import sys, time
from input_pipeline.host import distributed
index = int(sys.argv[2])
distributed.initialize(sys.argv[1], 2, index)
if index == 1:
  time.sleep(3)  # a slow teardown (under load: the input pipeline's threads)
distributed.end(True, 4, orderly=False)
"""


@pytest.mark.multiprocess
def test_a_process_slower_to_leave_keeps_its_exit_code():
  """Process 0 hosts the coordination service: had it exited at once, process 1 would lose the
  service and abort (-6) instead of ending with the code every process agreed on."""
  address = f"127.0.0.1:{free_port()}"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", LEAVING, address, str(i)],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=process_env(1),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  codes = [p.returncode for p in procs]
  assert codes == [4, 4], f"exit codes {codes}\n" + "\n".join(o[-2000:] for o in outputs)
