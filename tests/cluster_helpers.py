"""Real jax.distributed clusters on 127.0.0.1 for the tests: ``launch`` trains with several
``python -m train`` processes, ``run_command`` runs any other command as a cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import fork_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20
SAVED_AT = 15  # a checkpoint the 20-step runs keep (every 5 steps, the newest 3 kept)
# Fake CPU devices per process of the session's two-process clusters: several, so that each process
# has local devices to lay out, and no more, since every device is a gloo rank of its own and each
# collective passes through all of them over TCP (docs/platform-facts.md): a warm two-process tiny
# run took 18.5 CPU-s at 4 devices a process, 13 at 2 and 11 at 1 (2-core Xeon).
DEVICES = 2

# Twenty short steps, every loss logged, a checkpoint every five steps, eval only at the end and
# without its greedy sample: eight decode steps, each a round of cross-process collectives, were a
# sixth of a two-process run (generation across processes has its own test, test_multiprocess.py).
SETTINGS = {
  "train.steps": STEPS,
  "checkpoint.every": 5,
  "log.every": 1,
  "train.eval_every": 0,
  "log.sample_tokens": 0,
  "log.progress": False,
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


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


def cluster_flags(port: int, processes: int, index: int) -> list[str]:
  return [
    f"--coordinator_address=127.0.0.1:{port}",
    f"--num_processes={processes}",
    f"--process_id={index}",
  ]


def launch(
  workdir: str,
  processes: int,
  devices: int,
  cache_dir: str,
  timeout: float = 300,
  extra: tuple[str, ...] = (),
  expect: int | tuple[int, ...] = 0,
):
  """Runs ``python -m train`` as ``processes`` processes of ``devices`` fake CPU devices each,
  with ``extra`` flags after the usual ones.

  Returns each process's combined output. Kills every process (and its children) on a failure
  (an exit code other than ``expect``, one code or a tuple of those allowed) or when ``timeout``
  runs out, so that a hung collective cannot hold the test suite.
  """
  allowed = expect if isinstance(expect, tuple) else (expect,)
  port = free_port()
  env = process_env(devices)
  paths, procs = [], []
  try:
    for i in range(processes):
      cluster = cluster_flags(port, processes, i) if processes > 1 else []
      cmd = [sys.executable, "-m", "train", f"--workdir={workdir}", "--config=configs/tiny.py"]
      cmd += [*overrides(cache_dir), *extra, *cluster]
      paths.append(f"{workdir}.{processes}x{devices}.{i}.log")
      with open(paths[-1], "w") as log:  # the child keeps its own copy of the descriptor
        procs.append(
          fork_server.spawn(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
          )
        )
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, *allowed)]
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
  assert all(code in allowed for code in codes), (
    f"{processes} × {devices}: exit codes {codes} (negative = killed after {timeout}s)\n"
    + "\n".join(f"--- process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
  )
  return outputs


def run_command(module_args: list[str], processes: int, devices: int, timeout: float = 300):
  """``python -m MODULE ARGS`` as a jax.distributed cluster; (returncode, stdout, stderr) each."""
  port = free_port()
  env = process_env(devices)
  procs = []
  for i in range(processes):
    procs.append(
      fork_server.spawn(
        [sys.executable, "-m", *module_args, *cluster_flags(port, processes, i)],
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


def losses(workdir: str) -> dict[int, float]:
  """Each logged step's train loss; one record per step (a second writer would repeat them)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r["step"] for r in records if "train/loss" in r and "event" not in r]
  assert len(steps) == len(set(steps)), f"duplicate train records (two writers?): {steps}"
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r and "event" not in r}
