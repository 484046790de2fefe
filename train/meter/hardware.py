"""The one hardware table: what each accelerator can do, by its datasheet, and the TPU slice names.

Every figure that MFU, the energy estimate and ``train.plan`` need about a chip lives here:

- ``peak_flops``: the dense (no sparsity) matmul peak per compute dtype, FLOP/s per JAX device.
  On TPUs a float32 matmul runs at XLA's default precision, bf16 passes, so float32 is given the
  bf16 figure; on NVIDIA GPUs from Ampere on it runs on TF32 tensor cores at XLA's default
  precision, so float32 is given the dense TF32 figure.
- ``hbm_bytes``: memory per JAX device (binary units, as JAX reports it).
- ``power_watts``: typical board power under training load. Vendor TDP for GPUs; for TPUs an
  estimate where Google publishes none (each entry says which).
- ``quant``: the low-precision matmul formats (``model.quant``) the chip runs natively: fp8 on
  Hopper and Ada GPUs, int8 on TPUs from v4 on and NVIDIA GPUs from Ampere on.
- ``gpu``: for the GPUs ``train.plan`` compiles for without one (H100 SXM, H200), what XLA's GPU
  compiler needs to know of the device (``GpuSpec``); ``gpu_target_config`` writes it as the
  ``GpuTargetConfigProto`` text that the CUDA plugin's compile-only devices are made from.

CPUs have no datasheet peak here (it depends on the model, the cores and their clocks): their MFU
divides by a matmul peak measured in the process (``train/meter/flops.py``). Sources: NVIDIA's
A100, H100 and H200 datasheets; Google Cloud's "TPU versions" pages (cloud.google.com/tpu/docs/v2
... /v6e); the TPU v4 paper (ISCA 2023) for v4's power.

GPU names are ``KIND:N`` or ``KIND:NxNODES`` (``h100:8``, ``h200:8x4``: N GPUs per node, NODES
nodes joined over the data-centre network); ``parse`` gives a ``GpuNodes``.

Slice names follow Cloud TPU: v2/v3/v4/v5p-N count TensorCores (two per chip), v5e-N (also
v5litepod-N) and v6e-N count chips. ``parse("v5p-128")`` gives the slice's chips and the libtpu
topology string ("v5p:4x4x4") that ``train.plan`` compiles for.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """What XLA's GPU compiler needs to know of an NVIDIA GPU it compiles for without one: the
  fields of the ``gpu_device_info`` its cost model and kernel emitters read. Figures as the CUDA
  driver reports them for the device (as XLA's own published target configs record them)."""

  description: str  # the device name the driver reports (becomes jax.Device.device_kind)
  compute_capability: tuple[int, int]
  sm_count: int
  clock_ghz: float  # SM boost clock
  memory_bandwidth: int  # bytes/s, datasheet
  l2_cache_bytes: int
  shared_memory_per_sm: int = 233_472  # 228 KiB (Hopper)
  shared_memory_per_block_optin: int = 232_448  # 227 KiB (Hopper)


_HOPPER = dict(compute_capability=(9, 0), sm_count=132, clock_ghz=1.98, l2_cache_bytes=50 * 2**20)


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """Datasheet figures of one kind of JAX device."""

  name: str
  peak_flops: dict[str, float]  # compute dtype -> dense FLOP/s per JAX device
  hbm_bytes: int  # per JAX device
  power_watts: float  # per JAX device, under training load
  power_source: str
  quant: tuple[str, ...] = ()  # model.quant formats with native matmul units
  gpu: GpuSpec | None = None  # what XLA's GPU compiler is told (train.plan's GPU targets)
  compute_capability: float | None = None  # a GPU's CUDA compute capability (cuDNN's kernels)


def _tpu(name, bf16, hbm_gib, watts, power_source, quant=("int8",)):
  peaks = {"bfloat16": bf16, "float32": bf16}
  return Accelerator(name, peaks, hbm_gib * GiB, watts, power_source, quant)


def _gpu(name, bf16, tf32, hbm_gib, watts, quant=("fp8", "int8"), hbm_bytes=None, gpu=None, cc=9.0):
  peaks = {"bfloat16": bf16, "float16": bf16, "float32": tf32}
  hbm = hbm_bytes or int(hbm_gib * GiB)
  return Accelerator(name, peaks, hbm, watts, "NVIDIA TDP", quant, gpu, cc)


# Keyed by a lower-case substring of ``jax.Device.device_kind``; the first match wins, so more
# specific names come first ("tpu v5 lite" before "tpu v5", "h100 pcie" before "h100").
ACCELERATORS: dict[str, Accelerator] = {
  # v2 and v3 chips hold two TensorCores, each its own JAX device: figures per core.
  "tpu v2": _tpu("TPU v2", 22.5e12, 8, 140.0, "estimate: half a chip's ~280 W", ()),
  "tpu v3": _tpu("TPU v3", 61.5e12, 16, 225.0, "estimate: half a chip's ~450 W", ()),
  "tpu v4": _tpu("TPU v4", 275e12, 32, 192.0, "TPU v4 paper (ISCA 2023): 170-192 W per chip"),
  "tpu v5 lite": _tpu("TPU v5e", 197e12, 16, 170.0, "estimate: scaled from v4 by peak per watt"),
  "tpu v5e": _tpu("TPU v5e", 197e12, 16, 170.0, "estimate: scaled from v4 by peak per watt"),
  "tpu v5p": _tpu("TPU v5p", 459e12, 95, 300.0, "estimate: ~1.6x v4 per chip"),
  "tpu v5": _tpu("TPU v5p", 459e12, 95, 300.0, "estimate: ~1.6x v4 per chip"),
  "tpu v6 lite": _tpu("TPU v6e", 918e12, 32, 200.0, "estimate: Google's '67% more efficient'"),
  "tpu v6e": _tpu("TPU v6e", 918e12, 32, 200.0, "estimate: Google's '67% more efficient'"),
  # H200 and H100 SXM: the memory is what the CUDA driver reports as the device's total
  # (cuDeviceTotalMem, as XLA's published target configs for the two GPUs record it): the
  # H200's "141 GB" is exactly 141 GiB = 151,397,597,184 bytes; the H100's "80 GB" is
  # 84,942,979,072 bytes (79.1 GiB). Bandwidths: NVIDIA's datasheets (H200 4.8 TB/s; H100 SXM
  # 3.35 TB/s, 3,352,320,000,000 as the driver reports it).
  "h200": _gpu(
    "NVIDIA H200 SXM",
    989e12,
    494.5e12,
    None,
    700.0,
    hbm_bytes=151_397_597_184,
    gpu=GpuSpec("NVIDIA H200 141GB HBM3e", memory_bandwidth=4_800_000_000_000, **_HOPPER),
  ),
  "h100 pcie": _gpu("NVIDIA H100 PCIe", 756e12, 378e12, 80 * 1e9 / GiB, 350.0),
  "h100 nvl": _gpu("NVIDIA H100 NVL", 835e12, 417.5e12, 94 * 1e9 / GiB, 400.0),
  "h100": _gpu(
    "NVIDIA H100 SXM",
    989e12,
    494.5e12,
    None,
    700.0,
    hbm_bytes=84_942_979_072,
    gpu=GpuSpec("NVIDIA H100 80GB HBM3", memory_bandwidth=3_352_320_000_000, **_HOPPER),
  ),
  "a100": _gpu("NVIDIA A100 SXM", 312e12, 156e12, 80 * 1e9 / GiB, 400.0, ("int8",), cc=8.0),
  "l40s": _gpu("NVIDIA L40S", 362e12, 183e12, 48 * 1e9 / GiB, 350.0, cc=8.9),
  "l4": _gpu("NVIDIA L4", 121e12, 60e12, 24 * 1e9 / GiB, 72.0, cc=8.9),
}

# A CPU has no datasheet peak here; its power is per core (a 2-core share of a ~100-200 W socket).
CPU_WATTS_PER_CORE = 10.0
# A device with no table entry: the middle of the accelerator range.
DEFAULT_WATTS = 300.0


def lookup(device_kind: str) -> Accelerator | None:
  """The table entry for a ``jax.Device.device_kind`` ("TPU v5 lite", "NVIDIA H100 80GB HBM3")."""
  kind = device_kind.lower()
  for key, accelerator in ACCELERATORS.items():
    # The key is a word of the name: "l4" is not the start of "l40s", "h200" not the end of
    # "gh200" (a Grace Hopper part, not in the table).
    if re.search(r"(?<![a-z0-9])" + re.escape(key) + r"(?![a-z0-9])", kind):
      return accelerator
  return None


def check_quant(quant: str, emulation: bool, device: Any) -> None:
  """Raises ValueError when ``model.quant`` has no native units on ``device``'s chips and
  ``model.quant_emulation`` does not say that an emulation is meant."""
  accelerator = None if device.platform == "cpu" else lookup(device.device_kind)
  check_quant_on(quant, emulation, accelerator, f"{device.platform} ({device.device_kind})")


def check_quant_on(
  quant: str, emulation: bool, accelerator: Accelerator | None, unknown: str = "this chip"
) -> None:
  """``check_quant`` for a chip of the table (None: ``unknown``, which has no native formats),
  e.g. the chips a plan compiles for."""
  if quant == "none" or emulation:
    return
  native = accelerator.quant if accelerator else ()
  if quant in native:
    return
  if accelerator is None and unknown != "this chip" and not unknown.startswith("cpu"):
    raise ValueError(
      f"model.quant={quant!r}: {unknown} is not in Loom's hardware table "
      f"(train/meter/hardware.py), so whether it has native {quant} matmul units is unknown; "
      "set model.quant_emulation=True to run it anyway (native where the chip has the units, "
      "emulated where not), or model.quant='none'"
    )
  name = accelerator.name if accelerator else unknown
  would = f"model.quant={native[0]!r} or " if native else ""
  raise ValueError(
    f"model.quant={quant!r}: {name} has no {quant} matmul units (native there: "
    f"{', '.join(native) or 'none'}); use {would}'none', or model.quant_emulation=True to run "
    f"it emulated (for checking: no faster than 'none')"
  )


def datasheet_peak(device: Any, dtype: str) -> float | None:
  """Dense peak FLOP/s of one device for ``dtype``, or None (CPUs, unknown kinds or dtypes)."""
  if device.platform == "cpu":
    return None
  accelerator = lookup(device.device_kind)
  return accelerator.peak_flops.get(str(dtype)) if accelerator else None


# --- TPU slices: the names train.plan accepts ---


@dataclasses.dataclass(frozen=True)
class SliceFamily:
  """How one TPU generation's slices are named and laid out."""

  generation: str
  accelerator: str  # key into ACCELERATORS
  cores_per_name_unit: int  # 2 where the slice name counts TensorCores (v4-8 = 4 chips)
  megacore: bool  # two TensorCores per chip presented as one JAX device
  layouts: dict[int, tuple[int, ...]]  # chips per slice -> chips along each physical axis


# Physical chip layouts of the standard slice shapes (Cloud TPU docs' topology column).
_TORUS_3D = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
}
_GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
            256: (16, 16)}  # fmt: skip
SLICE_FAMILIES = {
  "v4": SliceFamily("v4", "tpu v4", 2, True, _TORUS_3D),
  "v5e": SliceFamily("v5e", "tpu v5e", 1, False, _GRID_2D),
  "v5p": SliceFamily("v5p", "tpu v5p", 2, True, _TORUS_3D),
  "v6e": SliceFamily("v6e", "tpu v6e", 1, False, _GRID_2D),
}
ALIASES = {"v5litepod": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice (or several identical ones joined over the data-centre network)."""

  name: str  # as given, e.g. "v5p-128"
  family: SliceFamily
  chips_per_slice: int
  num_slices: int = 1

  @property
  def chip(self) -> Accelerator:
    return ACCELERATORS[self.family.accelerator]

  @property
  def layout(self) -> tuple[int, ...]:
    return self.family.layouts[self.chips_per_slice]

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def libtpu_name(self) -> str:
    """What libtpu calls this slice, e.g. "v5p:4x4x4"."""
    return f"{self.family.generation}:{'x'.join(map(str, self.layout))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    # v4 / v5p hosts hold 2×2×1 chips; v5e / v6e single-host slices (up to 8 chips) hold the
    # whole slice, multi-host ones 2×2 per host.
    if len(self.layout) == 2 and self.chips_per_slice <= 8:
      return (*self.layout, 1)
    return (2, 2, 1)


def valid_names() -> list[str]:
  return [
    f"{family.generation}-{chips * family.cores_per_name_unit}"
    for family in SLICE_FAMILIES.values()
    for chips in family.layouts
  ]


def parse(name: str, num_slices: int = 1) -> Topology | GpuNodes:
  """A Cloud TPU slice name ("v5p-128", "v5e-256", "v5litepod-16", "v6e-64") as a Topology, or
  GPUs per node and nodes ("h100:8", "h200:8x4") as GpuNodes."""
  if ":" in name:
    return parse_gpus(name, num_slices)
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  generation = ALIASES.get(match.group(1), match.group(1)) if match else None
  if generation not in SLICE_FAMILIES:
    raise ValueError(
      f"unknown TPU topology {name!r}; valid: {', '.join(valid_names())}; or GPUs as "
      f"{GPU_NAME_FORM}"
    )
  family = SLICE_FAMILIES[generation]
  chips, remainder = divmod(int(match.group(2)), family.cores_per_name_unit)
  if remainder or chips not in family.layouts:
    valid = [n for n in valid_names() if n.startswith(generation + "-")]
    raise ValueError(
      f"unknown TPU topology {name!r}; valid {generation} slices: {', '.join(valid)}"
    )
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be at least 1")
  return Topology(name, family, chips, num_slices)


# --- GPU nodes: the names train.plan accepts, and the target configs it compiles for ---

GPU_NAME_FORM = "KIND:N or KIND:NxNODES (N GPUs per node, up to 8; e.g. h100:8, h200:8x4)"
GPUS_PER_NODE = (1, 2, 4, 8)  # an NVLink node (HGX) holds up to 8


def gpu_kinds() -> list[str]:
  """The table's GPUs that train.plan can compile for (those with a ``GpuSpec``)."""
  return [key for key, accelerator in ACCELERATORS.items() if accelerator.gpu is not None]


@dataclasses.dataclass(frozen=True)
class GpuNodes:
  """Nodes of NVIDIA GPUs: NVLink within a node, the data-centre network between nodes."""

  name: str  # as given, e.g. "h100:8x4"
  kind: str  # key into ACCELERATORS
  gpus_per_node: int
  nodes: int = 1

  @property
  def chip(self) -> Accelerator:
    return ACCELERATORS[self.kind]

  @property
  def chips(self) -> int:
    return self.gpus_per_node * self.nodes

  @property
  def num_slices(self) -> int:
    """The nodes: each one the DCN-side block of a hybrid mesh, as a TPU slice is."""
    return self.nodes

  @property
  def cuda_topology(self) -> str:
    """The CUDA plugin's topology string: nodes (slices) × hosts per node × GPUs per host."""
    return f"{self.nodes}x1x{self.gpus_per_node}"


def parse_gpus(name: str, num_slices: int = 1) -> GpuNodes:
  """``KIND:N`` or ``KIND:NxNODES`` ("h100:8", "h200:8x4") as GpuNodes; ``num_slices`` (the
  plan's --num_slices) is the nodes of a ``KIND:N`` name (a name with its nodes takes none)."""
  match = re.fullmatch(r"([a-z0-9]+):(\d+)(?:x(\d+))?", name.strip().lower())
  kinds = gpu_kinds()
  if not match or match.group(1) not in kinds:
    raise ValueError(
      f"unknown GPU hardware {name!r}: write {GPU_NAME_FORM} with KIND one of {', '.join(kinds)}"
    )
  per_node, nodes = int(match.group(2)), int(match.group(3) or 1)
  if per_node not in GPUS_PER_NODE or nodes < 1:
    raise ValueError(
      f"unknown GPU hardware {name!r}: {per_node} GPUs per node and {nodes} nodes; GPUs per "
      f"node must be one of {', '.join(map(str, GPUS_PER_NODE))} and nodes at least 1"
    )
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be at least 1")
  if match.group(3) and num_slices > 1:
    raise ValueError(
      f"{name!r} names its nodes and --num_slices={num_slices} names them again: give them once "
      f"({match.group(1)}:{per_node}x{nodes * num_slices}, or {match.group(1)}:{per_node} "
      f"--num_slices={nodes * num_slices})"
    )
  return GpuNodes(name, match.group(1), per_node, nodes * num_slices)


def gpu_target_config(accelerator: Accelerator) -> str:
  """The ``GpuTargetConfigProto`` text (XLA's stream_executor device description) of a GPU in
  the table, from which the CUDA plugin makes compile-only devices. Only the fields this jaxlib
  parses: XLA's own published spec files carry newer ones (collective_memory_granularity) that
  jaxlib 0.10.2 rejects. The fixed figures are NVIDIA's limits for every GPU since Volta."""
  gpu = accelerator.gpu
  if gpu is None:
    raise ValueError(
      f"{accelerator.name} has no GPU target config (compile targets: {gpu_kinds()})"
    )
  major, minor = gpu.compute_capability
  info = {
    "threads_per_block_limit": 1024,
    "threads_per_warp": 32,
    "shared_memory_per_block": 49152,
    "shared_memory_per_core": gpu.shared_memory_per_sm,
    "threads_per_core_limit": 2048,
    "core_count": gpu.sm_count,
    "fpus_per_core": 128,
    "block_dim_limit_x": 2**31 - 1,
    "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535,
    "memory_bandwidth": gpu.memory_bandwidth,
    "l2_cache_size": gpu.l2_cache_bytes,
    "clock_rate_ghz": gpu.clock_ghz,
    "device_memory_size": accelerator.hbm_bytes,
    "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin,
  }
  lines = ["gpu_device_info {", *(f"  {key}: {value}" for key, value in info.items())]
  lines += [
    f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
    "  registers_per_core_limit: 65536",
    "  registers_per_block_limit: 65536",
    "}",
    'platform_name: "CUDA"',
    # The cuDNN release the compiler may assume; 9.10 has every fused-attention form Loom uses.
    "dnn_version_info { major: 9 minor: 10 }",
    # The CUDA runtime (the jax-cuda12 wheels bring 12.9). Left out, the compiler assumes a
    # release before 12.0 and makes no fp8 GEMM (cuBLASLt's need CUDA 12): model.quant="fp8"
    # would compile to bf16 GEMMs here though an H100 runs fp8 ones.
    "runtime_version { major: 12 minor: 9 }",
    f'device_description_str: "{gpu.description}"',
  ]
  return "\n".join(lines) + "\n"
