"""Cloud TPU slice names, their chip layouts, and each chip generation's documented figures.

``parse("v5p-128")`` gives the slice's chips and the libtpu topology string ("v5p:4x4x4");
``devices(topology)`` asks libtpu for compile-only device descriptions of that slice, so a train
step can be compiled ahead of time for a pod on a CPU-only machine (``train.plan``).

Naming follows Cloud TPU: v4-N and v5p-N count TensorCores (two per chip, fused into one JAX
device by megacore), v5e-N (also v5litepod-N) and v6e-N count chips.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax

from train.meter import POWER_WATTS


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures of one TPU generation."""

  generation: str
  peak_bf16_flops: float  # dense bf16 matmul peak, FLOP/s
  hbm_bytes: int
  power_watts: float  # typical power under training load (an estimate, see train/meter.py)
  cores_per_name_unit: int  # 2 where the slice name counts TensorCores (v4-8 = 4 chips)
  megacore: bool  # two TensorCores per chip presented as one JAX device


GiB = 1024**3

# Sources: Google Cloud TPU system-architecture pages, "TPU versions" tables
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): bf16 peak per chip and HBM capacity per chip.
# JAX reports HBM in binary units (a v5e chip: 16 GiB), so capacities are taken as GiB.
CHIPS = {
  "v4": Chip("v4", 275e12, 32 * GiB, POWER_WATTS["tpu v4"], 2, True),
  "v5e": Chip("v5e", 197e12, 16 * GiB, POWER_WATTS["tpu v5e"], 1, False),
  "v5p": Chip("v5p", 459e12, 95 * GiB, POWER_WATTS["tpu v5p"], 2, True),
  "v6e": Chip("v6e", 918e12, 32 * GiB, POWER_WATTS["tpu v6e"], 1, False),
}
ALIASES = {"v5litepod": "v5e", "v6": "v6e"}

# Physical chip layouts of the standard slice shapes, by chip count (Cloud TPU docs' topology
# column). v4 and v5p are 3-D tori, v5e and v6e 2-D.
_LAYOUTS_3D = {
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
_LAYOUTS_2D = {
  1: (1, 1),
  4: (2, 2),
  8: (2, 4),
  16: (4, 4),
  32: (4, 8),
  64: (8, 8),
  128: (8, 16),
  256: (16, 16),
}
LAYOUTS = {"v4": _LAYOUTS_3D, "v5p": _LAYOUTS_3D, "v5e": _LAYOUTS_2D, "v6e": _LAYOUTS_2D}


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice (or several identical ones joined over the data-centre network)."""

  name: str  # as given, e.g. "v5p-128"
  chip: Chip
  chips_per_slice: int
  layout: tuple[int, ...]  # chips along each physical axis of one slice
  num_slices: int = 1

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def libtpu_name(self) -> str:
    """What libtpu calls this slice, e.g. "v5p:4x4x4"."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.layout))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    # v4 / v5p hosts hold 2×2×1 chips; v5e / v6e single-host slices (up to 8 chips) hold the
    # whole slice, multi-host ones 2×2 per host.
    if len(self.layout) == 2 and self.chips_per_slice <= 8:
      return (*self.layout, 1)
    return (2, 2, 1)


def valid_names() -> list[str]:
  names = []
  for generation, layouts in LAYOUTS.items():
    unit = CHIPS[generation].cores_per_name_unit
    names += [f"{generation}-{chips * unit}" for chips in layouts]
  return names


def parse(name: str, num_slices: int = 1) -> Topology:
  """A Cloud TPU slice name ("v5p-128", "v5e-256", "v5litepod-16", "v6e-64") as a Topology."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  generation = ALIASES.get(match.group(1), match.group(1)) if match else None
  if generation not in CHIPS:
    raise ValueError(f"unknown TPU topology {name!r}; valid: {', '.join(valid_names())}")
  chip = CHIPS[generation]
  count = int(match.group(2))
  chips, remainder = divmod(count, chip.cores_per_name_unit)
  if remainder or chips not in LAYOUTS[generation]:
    valid = [n for n in valid_names() if n.startswith(generation + "-")]
    raise ValueError(
      f"unknown TPU topology {name!r}; valid {generation} slices: {', '.join(valid)}"
    )
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be at least 1")
  return Topology(name, chip, chips, LAYOUTS[generation][chips], num_slices)


def devices(topology: Topology) -> list[jax.Device]:
  """Compile-only device descriptions of the slice(s), from libtpu (no TPU needed).

  Raises RuntimeError when libtpu is not installed or does not know the topology.
  """
  from jax.experimental import topologies

  # libtpu takes a host-wide lock file on load so that two processes don't both drive the chips;
  # compile-only descriptions drive none, and two planners (or a planner beside pytest) may run.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  options = {
    "chips_per_host_bounds": topology.chips_per_host_bounds,
    "num_slices": topology.num_slices,
  }
  if topology.chip.megacore:
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
