"""Compile-only devices of a TPU slice this machine does not have, from libtpu.

``compile_only_devices(hardware.parse("v5p-128"))`` asks libtpu for device descriptions of the
slice, so a train step can be compiled ahead of time for a pod on a CPU-only machine
(``train.plan``). No TPU is driven.
"""

from __future__ import annotations

import os

import jax

from train.meter.hardware import Topology


def compile_only_devices(topology: Topology) -> list[jax.Device]:
  """Device descriptions of the slice(s); RuntimeError if libtpu is missing or does not know it."""
  from jax.experimental import topologies  # noqa: PLC0415 - probes for libtpu (TPU planning only)

  # libtpu takes a host-wide lock file on load so that two processes don't both drive the chips;
  # compile-only descriptions drive none, and two planners (or a planner beside pytest) may run.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  options = {
    "chips_per_host_bounds": topology.chips_per_host_bounds,
    "num_slices": topology.num_slices,
  }
  if topology.family.megacore:
    options["chip_config_name"] = "megacore"
  try:
    description = topologies.get_topology_desc(
      platform="tpu", topology_name=topology.libtpu_name, **options
    )
  except Exception as e:  # no libtpu raises several kinds; all mean "cannot compile for TPU here"
    raise RuntimeError(
      f"libtpu cannot describe {topology.name} ({topology.libtpu_name}): {e}. Install it with "
      f"pip install 'jax[tpu]=={jax.__version__}'"
    ) from e
  found = len(description.devices)
  if found != topology.chips:
    raise RuntimeError(
      f"libtpu described {found} devices for {topology.name}, expected {topology.chips} chips"
    )
  return list(description.devices)
