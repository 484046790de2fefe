"""The device mesh and the logical-to-mesh sharding rules.

This is the only module that names mesh axes. Everything else speaks logical axis names
("batch", "embed", "heads", ...) and goes through the rule table in ``config.mesh.rules``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from models import sharding

# Outermost first: the later an axis, the closer its devices (tensor innermost, on the fastest
# links; expert next, for its all-to-all; context before it, for its per-layer key/value traffic;
# stage outermost: pipeline stages pass only one microbatch's activations per tick).
MESH_AXES = ("stage", "data", "fsdp", "context", "expert", "tensor")
TENSOR = "tensor"  # the axis that must stay within a host (train/config.py checks it)
EXPERT = "expert"  # shards a mixture of experts' experts (models/moe.py); 1 = none
CONTEXT = "context"  # shards the rows' length (models/context_parallel.py); 1 = none
STAGE = "stage"  # splits the scanned layers into pipeline stages (models/pipeline.py); 1 = none
# Axes a mesh config from before them (a checkpoint's saved config, a fallback built in code)
# may lack: absent means size 1.
OPTIONAL = (EXPERT, CONTEXT, STAGE)

log = logging.getLogger("loom")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def _sizes(mesh_config, prefix: str) -> dict[str, int]:
  # Meshes from before the DCN, expert, context and stage keys existed (a checkpoint's saved
  # config, a fallback built in code) have no such entries: they mean one slice and no such axis.
  return {
    axis: int(
      mesh_config.get(f"{prefix}{axis}", 1) if prefix or axis in OPTIONAL else mesh_config[axis]
    )
    for axis in MESH_AXES
  }


def _describe_config(ici: dict[str, int], dcn: dict[str, int]) -> str:
  described = ", ".join(f"mesh.{axis}={size}" for axis, size in ici.items())
  across = [f"mesh.dcn_{axis}={size}" for axis, size in dcn.items() if size != 1]
  return described + (", " + ", ".join(across) if across else "")


def hybrid_mesh_shape(mesh_config, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
  """Per-slice (ICI) and across-slice (DCN) sizes of each mesh axis for ``num_devices``.

  ``mesh.stage/data/fsdp/context/expert/tensor`` size the mesh inside one slice (one of them may be
  -1: the rest of a slice's devices); the ``mesh.dcn_*`` sizes multiply them across slices (TPU
  slices joined by the data-centre network, or GPU nodes). An axis's full size is ICI × DCN;
  with every DCN size 1 the mesh is one slice and ``mesh.*`` are the whole mesh.
  """
  ici, dcn = _sizes(mesh_config, ""), _sizes(mesh_config, "dcn_")
  described = _describe_config(ici, dcn)
  bad_dcn = [axis for axis, size in dcn.items() if size < 1]
  if bad_dcn:
    raise ValueError(f"mesh.dcn_* sizes must be positive integers, got {described}")
  slices = math.prod(dcn.values())
  if num_devices % slices:
    raise ValueError(
      f"{num_devices} devices cannot form {slices} slices of equal size ({described}); make "
      f"the product of the mesh.dcn_* sizes divide {num_devices}"
    )
  per_slice = num_devices // slices
  wildcards = [axis for axis, size in ici.items() if size == -1]
  if len(wildcards) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {described}")
  bad = [axis for axis, size in ici.items() if size < 1 and size != -1]
  if bad:
    raise ValueError(f"mesh sizes must be positive or -1, got {described}")
  where = f"{per_slice} devices per slice" if slices > 1 else f"{num_devices} devices"
  fixed = math.prod(size for size in ici.values() if size != -1)
  if wildcards:
    if per_slice % fixed:
      raise ValueError(
        f"cannot fill mesh.{wildcards[0]}=-1: {where} are not divisible by the product "
        f"{fixed} of the other axes ({described})"
      )
    ici[wildcards[0]] = per_slice // fixed
  elif fixed != per_slice:
    raise ValueError(
      f"the mesh ({described}) has {fixed} devices {'per slice ' if slices > 1 else ''}but "
      f"{where} are available; make the product equal {per_slice} or set one axis to -1"
    )
  return ici, dcn


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves ``config.mesh`` sizes (one may be -1 = the rest of the devices) for ``num_devices``:
  the full size of each axis, across slices included."""
  ici, dcn = hybrid_mesh_shape(mesh_config, num_devices)
  return {axis: ici[axis] * dcn[axis] for axis in MESH_AXES}


def _slice_key(devices: Sequence[jax.Device]) -> str | None:
  """Which device attribute tells slices apart: TPU slices, else processes (GPU nodes)."""
  if devices[0].platform == "tpu":
    # Hosts inside one TPU slice share its ICI: only slice_index marks a DCN boundary.
    return "slice_index" if len({getattr(d, "slice_index", 0) for d in devices}) > 1 else None
  return "process_index" if len({d.process_index for d in devices}) > 1 else None


def _single_slice_mesh(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
  try:
    # Lets the runtime order devices for the physical topology (ICI rings on TPU).
    return mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError) as e:
    fallback = np.asarray(devices).reshape(shape)
    if devices and devices[0].platform != "cpu":  # CPUs have no topology to miss
      log.warning(
        "the mesh %s cannot be laid out on the physical topology of %d %s devices (%s), "
        "physical coordinates %s; using enumeration order instead, device ids by mesh row %s",
        dict(zip(MESH_AXES, shape, strict=True)),
        len(devices),
        devices[0].device_kind,
        e,
        [getattr(d, "coords", d.id) for d in devices],
        [[d.id for d in row] for row in fallback.reshape(-1, shape[-1])],
      )
    return fallback


def _hybrid_device_array(
  ici: tuple[int, ...], dcn: tuple[int, ...], devices: Sequence[jax.Device], described: str
) -> np.ndarray:
  slices = math.prod(dcn)
  key = _slice_key(devices)
  if key is None and devices[0].platform == "cpu":
    # One CPU process has no slices: emulate them with contiguous blocks of its (fake) devices,
    # laid out exactly as create_hybrid_device_mesh lays out real ones, so that the hybrid
    # mesh's shape and shardings can be checked on a laptop.
    per_slice = len(devices) // slices
    blocks = [
      np.asarray(devices[i * per_slice : (i + 1) * per_slice]).reshape(ici) for i in range(slices)
    ]
    grid = np.empty(slices, dtype=object)
    grid[:] = blocks
    return np.block(grid.reshape(dcn).tolist())
  if key is None:
    where = "TPU slice" if devices[0].platform == "tpu" else "process"
    raise ValueError(
      f"the mesh asks for {slices} slices ({described}) but all {len(devices)} devices are in "
      f"one {where}; set the mesh.dcn_* sizes to 1 here"
    )
  found = len({getattr(d, key) for d in devices})
  if found != slices:
    raise ValueError(
      f"the mesh asks for {slices} slices ({described}) but the devices span {found} "
      f"({'TPU slices' if key == 'slice_index' else 'processes'}); make the product of the "
      f"mesh.dcn_* sizes equal {found}"
    )
  return mesh_utils.create_hybrid_device_mesh(
    ici, dcn, devices, process_is_granule=key == "process_index"
  )


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (stage, data, fsdp, context, expert, tensor) mesh over ``devices`` (default: all
  global devices).

  With any ``mesh.dcn_*`` size above 1 the mesh is hybrid: each slice holds an ICI-shaped block,
  and the blocks are tiled across slices (mesh_utils.create_hybrid_device_mesh), so the axes that
  cross slices carry only the traffic the DCN sizes put there.
  """
  devices = list(jax.devices() if devices is None else devices)
  ici, dcn = hybrid_mesh_shape(mesh_config, len(devices))
  ici_shape = tuple(ici[axis] for axis in MESH_AXES)
  dcn_shape = tuple(dcn[axis] for axis in MESH_AXES)
  if math.prod(dcn_shape) == 1:
    device_array = _single_slice_mesh(ici_shape, devices)
  else:
    device_array = _hybrid_device_array(ici_shape, dcn_shape, devices, _describe_config(ici, dcn))
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
        f"mesh.rules maps {logical!r} to unknown mesh axes {unknown}; valid: {MESH_AXES}"
      )
    rules.append((logical, target if isinstance(target, str) or target is None else tuple(target)))
  return tuple(rules)


def partition_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec over this mesh's axes (``models.sharding.spec_for``,
  the one resolver that parameters, activations, batches and the inference cache share)."""
  return sharding.spec_for(names, rules, MESH_AXES)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of [batch, length] input arrays."""
  return NamedSharding(mesh, partition_spec(("batch", "length"), rules))


def ways(mesh: Mesh, rules: Rules, logical_name: str) -> tuple[int, tuple[str, ...]]:
  """How many ways (and over which mesh axes) a dimension with this logical name is split."""
  spec = partition_spec((logical_name,), rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[axis] for axis in axes), axes


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split."""
  return ways(mesh, rules, "batch")[0]


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
  return " × ".join(f"{axis}={size}" for axis, size in mesh.shape.items())


def bound_steps_in_flight() -> bool:
  """The CPU-sync rule: whether a loop must wait for each step before dispatching the next.

  XLA:CPU's collectives can deadlock when many multi-device steps are in flight at once
  (docs/platform-facts.md), so on the CPU backend with more than one device every loop that
  dispatches steps back to back (training, the benchmark, decoding) waits for each one. TPUs and
  GPUs are not affected: there dispatch stays fully asynchronous.
  """
  return jax.devices()[0].platform == "cpu" and jax.device_count() > 1
