"""The run's meter: where wall time went, how many FLOPs were spent, and what that cost in energy.

Energy is an estimate unless stated otherwise: device-hours × a per-device power figure (the
table below, or ``meter.power_watts``) × the data centre's PUE; CO2e is energy × grid intensity.
Every figure in ``report.json`` carries its unit in its name and its source in ``assumptions``.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import jax

# Typical board power under training load, watts per device (one chip / GPU / CPU core). Sources:
# vendor TDP and published measurements; they are estimates, not meter readings.
POWER_WATTS = {
    "tpu v4": 192.0,  # Google, TPU v4 paper (ISCA 2023): mean 170-192 W per chip
    "tpu v5 lite": 170.0,  # v5e; Google publishes no figure: scaled from v4 by peak FLOPs/W
    "tpu v5e": 170.0,
    "tpu v5p": 300.0,  # estimate: ~1.6x v4 per chip
    "tpu v5": 300.0,
    "tpu v6 lite": 200.0,  # v6e (Trillium); estimate from Google's "67% more efficient than v5e"
    "tpu v6e": 200.0,
    "a100": 400.0,  # NVIDIA A100 SXM TDP
    "h100": 700.0,  # NVIDIA H100 SXM TDP
    "h200": 700.0,  # NVIDIA H200 SXM TDP
    "cpu": 10.0,  # per physical core under load (a 2-core share of a ~100-200 W server socket)
}


def device_power_watts(device: jax.Device, override: float = 0.0) -> tuple[float, str]:
  """Per-device power and where the figure came from."""
  if override > 0:
    return override, "meter.power_watts (user)"
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    return POWER_WATTS["cpu"] * (os.cpu_count() or 1), f"table: {POWER_WATTS['cpu']} W/core"
  for name, watts in POWER_WATTS.items():
    if name in kind:
      return watts, f"table: {name!r}"
  return 300.0, f"default 300 W (no table entry for {device.device_kind!r})"


@dataclasses.dataclass
class Meter:
  """Accumulates time per phase, tokens and MFU samples during a run."""

  flops_per_token: int
  peak_flops_per_second: float  # of all the devices this process drives together
  seconds: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
  tokens: int = 0
  mfu_samples: list[float] = dataclasses.field(default_factory=list)
  started: float = dataclasses.field(default_factory=time.perf_counter)

  @contextmanager
  def phase(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[name] += time.perf_counter() - start

  def mfu(self, tokens_per_second: float) -> float:
    return self.flops_per_token * tokens_per_second / self.peak_flops_per_second

  def record_window(self, tokens: int, seconds: float) -> tuple[float, float]:
    """Notes a window of train steps; returns (tokens/s, MFU) for it."""
    tokens_per_second = tokens / max(seconds, 1e-9)
    mfu = self.mfu(tokens_per_second)
    self.mfu_samples.append(mfu)
    return tokens_per_second, mfu

  def report(self, *, params: int, params_nonembedding: int, devices: list[jax.Device],
             pue: float, grid_kg_per_kwh: float, power_override: float) -> dict:
    wall = time.perf_counter() - self.started
    device_hours = wall * len(devices) / 3600
    watts, power_source = device_power_watts(devices[0], power_override)
    if devices[0].platform == "cpu":
      device_hours = wall / 3600  # fake CPU devices share one machine: count the machine once
    energy_kwh = device_hours * watts / 1000 * pue
    phases = {f"{name}_s": round(value, 3) for name, value in sorted(self.seconds.items())}
    return {
        "params": params,
        "params_nonembedding": params_nonembedding,
        "flops_per_token": self.flops_per_token,
        "tokens": self.tokens,
        "total_flops": self.flops_per_token * self.tokens,
        "wall_time_s": round(wall, 3),
        "time_breakdown": phases,
        "device_hours": device_hours,
        "mfu_mean": statistics.fmean(self.mfu_samples) if self.mfu_samples else None,
        "mfu_median": statistics.median(self.mfu_samples) if self.mfu_samples else None,
        "peak_flops_per_second": self.peak_flops_per_second,
        "energy_kwh": energy_kwh,
        "co2e_kg": energy_kwh * grid_kg_per_kwh,
        "assumptions": {
            "flops_formula": "6*(N_nonembedding + d_model*vocab) + 12*layers*heads*head_dim*seq_len"
                             " per token (train/flops.py)",
            "peak": "square fp32/bf16 matmul measured in this process (train/flops.py)",
            "power_watts_per_device": watts,
            "power_source": f"estimated, {power_source}",
            "pue": pue,
            "grid_kg_co2e_per_kwh": grid_kg_per_kwh,
            "devices": len(devices),
            "device_kind": devices[0].device_kind,
        },
    }
