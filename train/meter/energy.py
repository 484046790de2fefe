"""Energy: measured where the platform reports it, else device-hours × a documented power table.

Two sources, in order of preference:

- **measured**: cumulative energy counters read at the start and the end of a span. NVIDIA GPUs
  through NVML (``pynvml``, ``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver
  loaded, Volta and newer); CPUs through Linux RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``,
  microjoules per CPU package, wrapping at ``max_energy_range_uj``). RAPL covers the whole package,
  so other processes on the machine are counted too; NVML covers the GPUs this process drives.
- **estimated**: device-hours × the per-device power of the hardware table
  (``train/meter/hardware.py``), or ``meter.power_watts``.

Either way the device energy is multiplied by the data centre's PUE, and CO2e is energy × the grid's
carbon intensity (``meter.grid_kg_per_kwh``). These are the same counters CodeCarbon reads; Loom
reads them directly rather than depending on it (docs/speed.md, "The meter").
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence
from typing import Any, Protocol

import jax

from train.meter import hardware

RAPL_ROOT = "/sys/class/powercap"


def device_power_watts(device: Any, override: float = 0.0) -> tuple[float, str]:
  """Power of one device (a CPU counts as its whole machine) and where the figure came from."""
  if override > 0:
    return override, "meter.power_watts (user)"
  if device.platform == "cpu":
    cores = os.cpu_count() or 1
    per_core = hardware.CPU_WATTS_PER_CORE
    return per_core * cores, f"table: {per_core} W/core × {cores} cores"
  accelerator = hardware.lookup(device.device_kind)
  if accelerator is not None:
    return accelerator.power_watts, f"table: {accelerator.name} ({accelerator.power_source})"
  watts = hardware.DEFAULT_WATTS
  return watts, f"default {watts:.0f} W (no table entry for {device.device_kind!r})"


def device_hours(seconds: float, devices: Sequence[Any]) -> float:
  """Device-hours of a span; fake CPU devices share one machine, which is counted once."""
  if devices and devices[0].platform == "cpu":
    return seconds / 3600
  return seconds * len(devices) / 3600


class EnergyCounter(Protocol):
  """A cumulative energy reading of the devices this process drives."""

  source: str  # what was read, for the report

  def joules(self) -> float: ...


class RaplCounter:
  """Sum of the RAPL package counters (``intel-rapl:N``, not their sub-domains), wrap-aware."""

  def __init__(self, domains: list[str]):
    self.domains = domains
    self.source = f"RAPL ({len(domains)} CPU package(s), whole package, all processes)"
    self._max = [_read_int(os.path.join(d, "max_energy_range_uj")) for d in domains]
    self._last = [_read_int(os.path.join(d, "energy_uj")) for d in domains]
    self._total_uj = 0

  @classmethod
  def detect(cls, root: str = RAPL_ROOT) -> RaplCounter | None:
    domains = sorted(
      d
      for d in glob.glob(os.path.join(root, "intel-rapl:*"))
      if os.path.basename(d).count(":") == 1 and os.access(os.path.join(d, "energy_uj"), os.R_OK)
    )
    if not domains:
      return None
    try:
      return cls(domains)
    except (OSError, ValueError):  # listed but not readable (RAPL is often root-only)
      return None

  def joules(self) -> float:
    for i, domain in enumerate(self.domains):
      now = _read_int(os.path.join(domain, "energy_uj"))
      delta = now - self._last[i]
      if delta < 0:  # the counter wrapped around since the last reading
        delta += self._max[i]
      self._total_uj += delta
      self._last[i] = now
    return self._total_uj / 1e6


def nvml_device(ordinal: int, environ=os.environ) -> tuple[str, int | str]:
  """How NVML names the GPU that CUDA calls ``ordinal`` (jax.Device.local_hardware_id): NVML
  ignores CUDA_VISIBLE_DEVICES, so a process given GPUs "4,5,6,7" has CUDA ordinal 0 on NVML's
  index 4 (or a UUID, "GPU-..."/"MIG-..."). ("index", n) or ("uuid", text)."""
  visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
  if ordinal >= len(visible):
    return "index", ordinal
  entry = visible[ordinal]
  if entry.isdigit():
    return "index", int(entry)
  return "uuid", entry


class NvmlCounter:
  """Total energy of this process's NVIDIA GPUs through NVML (millijoules since driver load)."""

  def __init__(self, pynvml: Any, handles: list[Any]):
    self._nvml = pynvml
    self._handles = handles
    self.source = f"NVML total energy ({len(handles)} GPU(s))"

  @classmethod
  def detect(cls, devices: Sequence[Any]) -> NvmlCounter | None:
    if not devices or devices[0].platform != "gpu":
      return None
    try:
      import pynvml  # noqa: PLC0415 - the optional [cuda] extra (NVIDIA GPUs only)
    except ImportError:
      return None
    try:
      pynvml.nvmlInit()
      handles = []
      for d in devices:
        if d.process_index != jax.process_index():
          continue
        kind, key = nvml_device(getattr(d, "local_hardware_id", None) or 0)
        by = (
          pynvml.nvmlDeviceGetHandleByUUID if kind == "uuid" else pynvml.nvmlDeviceGetHandleByIndex
        )
        handles.append(by(key))
      counter = cls(pynvml, handles)
      counter.joules()  # GPUs older than Volta have no energy counter: fail here, not later
      return counter
    except Exception:  # noqa: BLE001 (any NVML failure means: not measurable here)
      return None

  def joules(self) -> float:
    return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) / 1e3


def detect_counter(devices: Sequence[Any] | None = None) -> EnergyCounter | None:
  """The platform's energy counter for these devices, or None where it reports none."""
  devices = list(jax.devices() if devices is None else devices)
  if devices and devices[0].platform == "cpu":
    return RaplCounter.detect()
  return NvmlCounter.detect(devices)


@dataclasses.dataclass
class EnergySpan:
  """Energy of a span of work: start it, do the work, then ask for ``figures``."""

  counter: EnergyCounter | None
  start_joules: float = 0.0

  @classmethod
  def start(cls, devices: Sequence[Any] | None = None) -> EnergySpan:
    counter = detect_counter(devices)
    return cls(counter, counter.joules() if counter else 0.0)

  def measured_joules(self) -> float | None:
    if self.counter is None:
      return None
    return (self.counter.joules() - self.start_joules) * jax.process_count()


def energy_figures(
  *,
  seconds: float,
  devices: Sequence[Any],
  pue: float,
  grid_kg_per_kwh: float,
  power_override: float = 0.0,
  measured_joules: float | None = None,
  measured_by: str = "",
) -> dict[str, Any]:
  """kWh and kg CO2e of a span of ``seconds`` on ``devices``, measured if a reading is given.

  A user power override wins over a measurement: it is there to correct the estimate's basis.
  Measured energy from one process is scaled by the process count (every process is assumed to
  draw the same).
  """
  hours = device_hours(seconds, devices)
  watts, power_source = device_power_watts(devices[0], power_override)
  if measured_joules is not None and power_override <= 0:
    device_kwh = measured_joules / 3.6e6
    source, method = "measured", f"{measured_by} × PUE"
  else:
    device_kwh = hours * watts / 1000
    source, method = "estimated", f"device-hours × {watts:g} W/device ({power_source}) × PUE"
  energy_kwh = device_kwh * pue
  return {
    "device_hours": hours,
    "energy_kwh": energy_kwh,
    "co2e_kg": energy_kwh * grid_kg_per_kwh,
    "energy_source": source,
    "energy_method": method,
    "power_watts_per_device": watts,
    "power_source": power_source,
  }


def _read_int(path: str) -> int:
  with open(path) as f:
    return int(f.read().strip())
