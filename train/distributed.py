"""Starting ``jax.distributed`` when a run spans more than one process.

JAX detects Cloud TPU pods and Slurm by itself; elsewhere the coordinator address, the process
count and this process's index come from flags (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID environment variables). Failures are raised, never swallowed: a process that
silently trains alone would waste the whole job.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("loom")


def cluster_detected(environ=os.environ) -> str | None:
  """Names the multi-process environment JAX can auto-detect, or None on a single process."""
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in environ:
    return "slurm"
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in environ:
    return "cloud_tpu"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, environ=os.environ) -> bool:
  """Initialises jax.distributed when needed; returns whether it did."""
  coordinator_address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(environ["JAX_NUM_PROCESSES"])
  if process_id is None and environ.get("JAX_PROCESS_ID"):
    process_id = int(environ["JAX_PROCESS_ID"])
  explicit = [coordinator_address, num_processes, process_id]
  if any(value is not None for value in explicit):
    missing = [name for name, value in zip(
        ("--coordinator_address", "--num_processes", "--process_id"), explicit) if value is None]
    if missing:
      raise ValueError(f"multi-process flags are incomplete: also pass {', '.join(missing)}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  detected = cluster_detected(environ)
  if detected:
    log.info("detected a %s cluster; initialising jax.distributed", detected)
    jax.distributed.initialize()
    return True
  return False
