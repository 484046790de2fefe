"""The device mesh and the logical-to-mesh sharding rules.

This is the only module that names mesh axes. Everything else speaks logical axis names
("batch", "embed", "heads", ...) and goes through the rule table in ``config.mesh.rules``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves ``config.mesh`` sizes (one may be -1 = the rest of the devices) for ``num_devices``."""
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  wildcards = [axis for axis, size in sizes.items() if size == -1]
  described = ", ".join(f"mesh.{axis}={size}" for axis, size in sizes.items())
  if len(wildcards) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {described}")
  bad = [axis for axis, size in sizes.items() if size < 1 and size != -1]
  if bad:
    raise ValueError(f"mesh sizes must be positive or -1, got {described}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if wildcards:
    if num_devices % fixed:
      raise ValueError(
          f"cannot fill mesh.{wildcards[0]}=-1: {num_devices} devices are not divisible by the "
          f"product {fixed} of the other axes ({described})")
    sizes[wildcards[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"the mesh ({described}) has {fixed} devices but {num_devices} are available; make the "
        f"product equal {num_devices} or set one axis to -1")
  return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh over ``devices`` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  try:
    # Lets the runtime order devices for the physical topology (ICI rings on TPU).
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(mesh_config) -> Rules:
  """The rule table as tuples, checked to name only known mesh axes."""
  rules = []
  for entry in mesh_config.rules:
    if len(entry) != 2:
      raise ValueError(f"mesh.rules entry {entry!r} must be (logical_name, mesh_axes)")
    logical, target = entry
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    unknown = [t for t in targets if t not in MESH_AXES]
    if unknown:
      raise ValueError(
          f"mesh.rules maps {logical!r} to unknown mesh axes {unknown}; valid: {MESH_AXES}")
    rules.append((logical, target if isinstance(target, str) or target is None else tuple(target)))
  return tuple(rules)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec with ``rules`` (unlisted names replicate)."""
  table = dict(rules)
  return PartitionSpec(*(table.get(name) if name is not None else None for name in names))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of [batch, length] input arrays."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules))


def ways(mesh: Mesh, rules: Rules, logical_name: str) -> tuple[int, tuple[str, ...]]:
  """How many ways (and over which mesh axes) a dimension with this logical name is split."""
  spec = logical_to_spec((logical_name,), rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[axis] for axis in axes), axes


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split."""
  return ways(mesh, rules, "batch")[0]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
  return " × ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
