"""Starting ``jax.distributed`` when a run spans more than one process.

Three ways in, checked in this order:

1. Explicit: ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the
   JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables; flags win).
   All three or none: a partial set is an error, not a guess.
2. A cluster JAX detects by itself: Slurm job steps (``srun``), GKE TPU pods
   (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES), multi-slice TPU jobs (MEGASCALE_* variables) and
   Cloud TPU VMs, whose worker list JAX reads from the GCE metadata server. JAX's own detection is
   left to do the work (``jax.distributed.initialize()`` without arguments); this module only
   decides *whether* to call it, from the same signals JAX uses.
3. Otherwise a single process: nothing to initialise (a laptop, one GPU box, Colab).

``LOOM_DISTRIBUTED=off`` turns the detection of step 2 off (for a single-host TPU VM whose
metadata server JAX cannot use); explicit settings still count.

Failures are raised with what was attempted, never swallowed: a process that silently trains alone
would waste the whole job (and write checkpoints that clash with its peers').
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from collections.abc import Callable, Mapping

import jax
from absl import flags

from input_pipeline.host import agreement

log = logging.getLogger("loom")

# The variables JAX's SlurmCluster needs (jax/_src/clusters/slurm_cluster.py): all are set inside a
# job step (srun), not in the batch script itself.
SLURM_VARIABLES = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)
EXPLICIT_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def _int_from_env(environ: Mapping[str, str], name: str) -> int | None:
  value = environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def on_tpu_vm() -> bool:
  """Whether TPU chips are attached to this host (Cloud TPU VMs expose them as /dev/accel* or,
  from v5e on, as VFIO devices)."""
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def cluster_detected(
  environ: Mapping[str, str] = os.environ, tpu_vm: bool | None = None
) -> str | None:
  """Names the multi-process environment JAX can auto-detect, or None for a single process.

  ``tpu_vm`` (default: look at this host's devices) says whether TPU chips are attached; on a
  Cloud TPU VM JAX finds its peers through the metadata server, so no variable announces them.
  """
  tasks = _int_from_env(environ, "SLURM_NTASKS")
  if tasks is not None and tasks > 1 and all(name in environ for name in SLURM_VARIABLES):
    return "slurm"
  if (
    "MEGASCALE_COORDINATOR_ADDRESS" in environ
    or (_int_from_env(environ, "MEGASCALE_NUM_SLICES") or 1) > 1
  ):
    return "cloud_tpu_multislice"
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if len([host for host in hosts.split(",") if host.strip()]) > 1:
    return "gke_tpu"
  if on_tpu_vm() if tpu_vm is None else tpu_vm:
    # One host or many: JAX asks the metadata server and forms a cluster of one if alone.
    return "cloud_tpu_vm"
  return None


def explicit_settings(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  environ: Mapping[str, str] = os.environ,
) -> dict[str, object] | None:
  """The explicit cluster settings from flags, else environment; None when none is given.

  Raises ValueError for a partial set, a malformed address or an out-of-range process id.
  """
  coordinator_address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _int_from_env(environ, "JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _int_from_env(environ, "JAX_PROCESS_ID")
  values = (coordinator_address, num_processes, process_id)
  if all(value is None for value in values):
    return None
  missing = [flag for flag, value in zip(EXPLICIT_FLAGS, values, strict=True) if value is None]
  if missing:
    given = ", ".join(
      f"{flag}={value}"
      for flag, value in zip(EXPLICIT_FLAGS, values, strict=True)
      if value is not None
    )
    raise ValueError(
      f"multi-process settings are incomplete: got {given}; also pass {', '.join(missing)} "
      f"(or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
    )
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(
      f"--coordinator_address={coordinator_address!r} must be HOST:PORT with a port in "
      f"1..65535, e.g. 10.0.0.2:8476 (the address of process 0)"
    )
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be at least 1")
  if not 0 <= process_id < num_processes:
    raise ValueError(
      f"--process_id={process_id} must be in [0, {num_processes}) for "
      f"--num_processes={num_processes}"
    )
  return {
    "coordinator_address": coordinator_address,
    "num_processes": num_processes,
    "process_id": process_id,
  }


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  environ: Mapping[str, str] = os.environ,
  *,
  tpu_vm: bool | None = None,
  initialize_fn: Callable[..., None] | None = None,
) -> bool:
  """Initialises jax.distributed when the run spans processes; returns whether it did.

  ``environ``, ``tpu_vm`` and ``initialize_fn`` (default ``jax.distributed.initialize``) are
  injectable so that tests can play a Slurm job or a TPU pod without starting one.
  """
  initialize_fn = initialize_fn or jax.distributed.initialize
  settings = explicit_settings(coordinator_address, num_processes, process_id, environ)
  if settings is not None:
    how = (
      f"process {settings['process_id']} of {settings['num_processes']}, coordinator "
      f"{settings['coordinator_address']}"
    )
  else:
    mode = environ.get("LOOM_DISTRIBUTED", "auto").strip().lower() or "auto"
    if mode not in ("auto", "off"):
      raise ValueError(f"LOOM_DISTRIBUTED={mode!r} must be 'auto' (default) or 'off'")
    detected = cluster_detected(environ, tpu_vm) if mode == "auto" else None
    if detected is None:
      return False
    settings, how = {}, f"auto-detected {detected} cluster"
  log.info("initialising jax.distributed: %s", how)
  try:
    initialize_fn(**settings)
  except Exception as e:  # re-raised with context: a lone process must never train by itself
    raise RuntimeError(f"jax.distributed.initialize failed ({how}): {e}") from e
  return True


def define_flags() -> None:
  """The multi-process flags every command takes (``python -m train``'s own)."""
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0, for multi-process runs JAX cannot detect by itself.",
  )
  flags.DEFINE_integer("num_processes", None, "Processes in the run.")
  flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize_from_flags() -> bool:
  """``initialize`` with the values of ``define_flags``' flags."""
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id)


# Exit codes after which every process of a cluster has agreed on the outcome (done; preempted and
# saved): the cluster is shut down in order.
ORDERLY_CODES = (0, 75)


def end(started: bool, code: int, *, orderly: bool | None = None) -> None:
  """Leaves a command: a started cluster is shut down and the process exits at once (a CPU
  client destructor can hang at interpreter exit: docs/platform-facts.md); otherwise a normal
  exit. ``orderly`` (default: ``code`` in ORDERLY_CODES) says whether every process agreed."""
  if started:
    sys.stdout.flush()
    sys.stderr.flush()
    # A result every process agreed on (orderly) ends the cluster properly. After a failure peers
    # may be waiting for this process in a collective: no shutdown barrier, only a short wait on
    # process 0 for the others that are leaving too (the coordination service's heartbeats end
    # the ones that never come).
    if code in ORDERLY_CODES if orderly is None else orderly:
      jax.distributed.shutdown()
    else:
      agreement.leave()
    os._exit(code)
  sys.exit(code)
