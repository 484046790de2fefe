"""The run's meter: where wall time went, how many FLOPs were spent, and what that cost in energy.

Energy is measured where the platform reports it (NVML on NVIDIA GPUs, RAPL on Linux CPUs) and
estimated otherwise: device-hours × a per-device power figure (the hardware table,
``train/meter/hardware.py``, or ``meter.power_watts``) × the data centre's PUE; CO2e is energy ×
grid intensity. ``report.json`` keeps its flat keys (``params``, ``energy_kwh``, ...) and adds
``figures``: every figure with its unit and its source ("counted", "measured" or "estimated").
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import jax

from train.meter import energy

# The phases the trainer times; each appears in the report's breakdown even when it took no time.
PHASES = ("compile", "train", "eval", "checkpoint", "input_wait", "data")

FLOPS_FORMULA = (
  "6*(N_nonembedding_active + d_model*vocab if tied) + 12*layers*heads*head_dim*seq_len per "
  "token; N_nonembedding_active: an untied output layer included, an MoE's router and K experts; "
  "LoRA: 4 per frozen weight, 6 per adapter weight; DPO (not SimPO) and GRPO with a KL term add "
  "the reference model's forward pass, 2*N_nonembedding_active + 4*layers*heads*head_dim*seq_len; "
  "attention over the whole seq_len x seq_len "
  "square (PaLM's and nanoGPT's convention: causal masks and packed documents not discounted); "
  "rematerialised and chunked-loss recompute not counted (train/meter/flops.py)"
)


@dataclasses.dataclass
class Meter:
  """Accumulates time per phase, tokens and MFU samples during a run."""

  flops_per_token: int
  peak_flops_per_second: float  # of all the devices this process drives together
  peak_source: str = "measured"  # see train/meter/flops.py, Peak
  seconds: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
  tokens: int = 0
  mfu_samples: list[float] = dataclasses.field(default_factory=list)
  started: float = dataclasses.field(default_factory=time.perf_counter)
  # Energy counters read from the meter's creation (None inside where the platform has none).
  energy_span: energy.EnergySpan = dataclasses.field(default_factory=energy.EnergySpan.start)

  # The seconds spent in the phases opened inside each open phase (the innermost last).
  _inner: list[float] = dataclasses.field(default_factory=list, repr=False)

  @contextmanager
  def phase(self, name: str):
    """Times a phase; one opened inside another takes its seconds from the outer one, so that
    the phases never count a second twice (a restore inside start-up is checkpoint time)."""
    start = time.perf_counter()
    self._inner.append(0.0)
    try:
      yield
    finally:
      elapsed = time.perf_counter() - start
      self.seconds[name] += elapsed - self._inner.pop()
      if self._inner:
        self._inner[-1] += elapsed

  def mfu(self, tokens_per_second: float) -> float:
    return self.flops_per_token * tokens_per_second / self.peak_flops_per_second

  def record_window(self, tokens: int, seconds: float) -> tuple[float, float]:
    """Notes a window of train steps; returns (tokens/s, MFU) for it."""
    tokens_per_second = tokens / max(seconds, 1e-9)
    mfu = self.mfu(tokens_per_second)
    self.mfu_samples.append(mfu)
    return tokens_per_second, mfu

  def report(
    self,
    *,
    params: int,
    params_nonembedding: int,
    params_active: int | None = None,
    devices: list[jax.Device],
    pue: float,
    grid_kg_per_kwh: float,
    power_override: float,
    wall_seconds: float | None = None,
  ) -> dict[str, Any]:
    """The meter's figures for report.json (flat keys kept stable; ``figures`` adds units)."""
    wall = time.perf_counter() - self.started if wall_seconds is None else wall_seconds
    power = energy.energy_figures(
      seconds=wall,
      devices=devices,
      pue=pue,
      grid_kg_per_kwh=grid_kg_per_kwh,
      power_override=power_override,
      measured_joules=self.energy_span.measured_joules(),
      measured_by=self.energy_span.counter.source if self.energy_span.counter else "",
    )
    report = {
      "params": params,
      "params_nonembedding": params_nonembedding,
      # What one token uses (an MoE model's router and chosen experts): FLOPs count these.
      "params_active": params if params_active is None else params_active,
      "flops_per_token": self.flops_per_token,
      "tokens": self.tokens,
      "total_flops": self.flops_per_token * self.tokens,
      "wall_time_s": round(wall, 3),
      "time_breakdown": self._phases(wall),
      "device_hours": power["device_hours"],
      "mfu_mean": statistics.fmean(self.mfu_samples) if self.mfu_samples else None,
      "mfu_median": statistics.median(self.mfu_samples) if self.mfu_samples else None,
      "peak_flops_per_second": self.peak_flops_per_second,
      "energy_kwh": power["energy_kwh"],
      "energy_source": power["energy_source"],
      "co2e_kg": power["co2e_kg"],
    }
    report["figures"] = _figures(report, peak_source=self.peak_source)
    estimated = power["energy_source"] == "estimated"
    report["assumptions"] = {
      "flops_formula": FLOPS_FORMULA,
      "peak": self.peak_source,
      "energy_method": power["energy_method"],
      "power_watts_per_device": power["power_watts_per_device"],
      "power_source": f"estimated, {power['power_source']}"
      if estimated
      else f"measured, {power['energy_method']}",
      "pue": pue,
      "grid_kg_co2e_per_kwh": grid_kg_per_kwh,
      "devices": len(devices),
      "device_kind": devices[0].device_kind,
    }
    return report

  def _phases(self, wall: float) -> dict[str, float]:
    phases = {f"{name}_s": round(self.seconds.get(name, 0.0), 3) for name in PHASES}
    phases.update({f"{name}_s": round(value, 3) for name, value in sorted(self.seconds.items())})
    # Wall time the phases do not cover: start-up (data, mesh), logging, the final report.
    phases["other_s"] = round(max(wall - sum(self.seconds.values()), 0.0), 3)
    return phases


# Unit and source of each flat report figure ("energy_kwh" takes its source from the report).
_UNITS = {
  "params": ("parameters", "counted"),
  "params_nonembedding": ("parameters", "counted"),
  "flops_per_token": ("FLOP/token", "estimated (formula)"),
  "tokens": ("tokens", "counted"),
  "total_flops": ("FLOP", "estimated (formula × tokens)"),
  "wall_time_s": ("s", "measured"),
  "device_hours": ("device-hours", "measured (wall time × devices)"),
  "mfu_mean": ("fraction of peak", "measured"),
  "mfu_median": ("fraction of peak", "measured"),
  "peak_flops_per_second": ("FLOP/s", None),
  "energy_kwh": ("kWh", None),
  "co2e_kg": ("kg CO2e", "estimated (energy × grid intensity)"),
}


def goodput(report: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
  """Productive step time over wall time, and where the rest went (seconds, measured; the steps
  run twice are valued at this attempt's mean step time). Productive: the train phase, less the
  steps thrown away by rollbacks and the steps redone after a restart."""
  phases = report["time_breakdown"]
  wall = report["wall_time_s"]
  steps_run = report["tokens"] / tokens_per_step if tokens_per_step else 0
  mean_step = phases["train_s"] / steps_run if steps_run else 0.0
  redone = report.get("redone_steps", 0) + report.get("redone_steps_after_restart", 0)
  redone_s = min(redone * mean_step, phases["train_s"])
  productive = phases["train_s"] - redone_s
  lost = {name[:-2]: value for name, value in phases.items() if name != "train_s"}
  lost["redone_steps"] = round(redone_s, 3)
  return {
    "goodput": productive / wall if wall else 0.0,
    "productive_s": round(productive, 3),
    "wall_s": wall,
    "lost_s": lost,
    "redone_steps": redone,
    "restarted_from_step": report.get("restarted_from_step", 0),
    # Which checkpoint tier the restart came from ("local", "persistent"; "none": a fresh start).
    "restored_from": report.get("restored_from", {}).get("tier", "none"),
  }


def _figures(report: dict[str, Any], *, peak_source: str) -> dict[str, dict[str, Any]]:
  """Every figure of the report with its value, unit and source."""
  sources = {"peak_flops_per_second": peak_source, "energy_kwh": report["energy_source"]}
  figures = {}
  for name, (unit, source) in _UNITS.items():
    figures[name] = {"value": report[name], "unit": unit, "source": source or sources[name]}
    if name == "wall_time_s":
      for phase, seconds in report["time_breakdown"].items():
        figures[f"time_breakdown.{phase}"] = {"value": seconds, "unit": "s", "source": "measured"}
  return figures


def summary_lines(report: dict[str, Any]) -> list[str]:
  """The meter's figures as log lines, each with its unit and source, for the end of a run."""

  def mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"

  breakdown = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in report["time_breakdown"].items())
  lines = [
    f"meter: {report['params']:,} params ({report['params_nonembedding']:,} without "
    f"embeddings); {report['flops_per_token']:,} FLOPs/token (estimated: "
    f"{report['assumptions']['flops_formula']})",
    f"meter: {report['tokens']:,} tokens, {report['total_flops']:.3g} FLOPs (estimated); "
    f"wall {report['wall_time_s']:.1f} s (measured: {breakdown} s)",
    f"meter: {report['device_hours']:.3g} device-hours; MFU mean {mfu(report['mfu_mean'])}, "
    f"median {mfu(report['mfu_median'])} of {report['peak_flops_per_second'] / 1e9:,.0f} "
    f"GFLOP/s ({report['assumptions']['peak']})",
    f"meter: {report['energy_kwh']:.3g} kWh ({report['energy_source']}: "
    f"{report['assumptions']['energy_method']}, PUE {report['assumptions']['pue']}), "
    f"{report['co2e_kg']:.3g} kg CO2e (estimated at "
    f"{report['assumptions']['grid_kg_co2e_per_kwh']} kg/kWh)",
  ]
  if "goodput" in report:
    g = report["goodput"]
    worst = sorted(g["lost_s"].items(), key=lambda item: -item[1])[:3]
    lines.append(
      f"meter: goodput {g['goodput']:.1%} (productive steps {g['productive_s']:.1f} s of "
      f"{g['wall_s']:.1f} s wall; most lost to "
      + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in worst)
      + f"; {g['redone_steps']} steps redone"
      + (
        f" after resuming from the {g['restored_from']} tier at step {g['restarted_from_step']})"
        if g.get("restored_from", "none") != "none"
        else ")"
      )
    )
  return lines
