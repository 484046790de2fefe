"""Compile-only devices of NVIDIA GPU nodes this machine does not have, from the CUDA plugin.

``compile_only_devices(hardware.parse("h100:8x4"))`` asks the CUDA PJRT plugin (the
``[gpu-plan]`` extra) for device descriptions made from the target config that the hardware table
writes (``hardware.gpu_target_config``), so a train step can be compiled for GPUs on a CPU-only
machine (``train.plan``). No GPU is driven: JAX's platform must be the CPU (the plan sets it), or
the plugin tries to start CUDA first.
"""

from __future__ import annotations

import jax

from train.meter import hardware

INSTALL = "pip install -e '.[gpu-plan]' (the CUDA plugin and the libraries it loads)"


def compile_only_devices(nodes: hardware.GpuNodes) -> list[jax.Device]:
  """Device descriptions of the nodes' GPUs, each node one process (``process_index``), so a
  hybrid mesh puts nodes on its DCN axes; RuntimeError if the CUDA plugin is missing."""
  from jax.experimental import topologies  # noqa: PLC0415 - probes for the plugin (GPU plans only)

  try:
    description = topologies.get_topology_desc(
      platform="cuda",
      target_config=hardware.gpu_target_config(nodes.chip),
      topology=nodes.cuda_topology,
    )
  except Exception as e:  # no plugin raises several kinds; all mean "cannot compile for CUDA here"
    raise RuntimeError(
      f"the CUDA plugin cannot describe {nodes.name} ({nodes.cuda_topology}): "
      f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}. "
      f"Install it with {INSTALL}"
    ) from e
  found = len(description.devices)
  if found != nodes.chips:
    raise RuntimeError(
      f"the CUDA plugin described {found} devices for {nodes.name}, expected {nodes.chips}"
    )
  return list(description.devices)
