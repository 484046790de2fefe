"""``python -m train.report DIR``: the run's curves and meter summary, drawn to ``DIR/report.png``.

Reads ``DIR/metrics.jsonl`` (train and eval loss, tokens/s and MFU per logged step) and, when the
run has finished, ``DIR/report.json`` (the meter). Drawn with matplotlib's Agg backend: no display.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

from input_pipeline.host import command, storage

CURVES = (  # (panel title, y label, [(metrics key, legend label)])
  ("Loss", "nats / token", [("train/loss", "train"), ("eval/loss", "eval")]),
  ("Throughput", "tokens / s", [("perf/tokens_per_second", "train")]),
  ("Model FLOPs utilisation", "fraction of measured peak", [("perf/mfu", "MFU")]),
)


def read_metrics(path) -> list[dict[str, Any]]:
  """The JSON records of metrics.jsonl; a line torn by a crash is skipped."""
  records = []
  for line in storage.absolute(path).read_text(encoding="utf-8").splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, skipping records without it and non-finite values."""
  steps, values = [], []
  for record in records:
    value = record.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
      steps.append(int(record["step"]))
      values.append(float(value))
  return steps, values


def summary_text(report: dict[str, Any] | None) -> str:
  """The meter as lines of 'figure: value unit (source)'."""
  if report is None:
    return "no report.json yet (the run has not finished)"
  figures = report.get("figures")
  if figures is None:  # a report from before figures carried units: show the flat keys
    return "\n".join(f"{k}: {v}" for k, v in report.items() if isinstance(v, (int, float)))
  lines = []
  for name, figure in figures.items():
    value = figure["value"]
    shown = "n/a" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    lines.append(f"{name}: {shown} {figure['unit']} ({figure['source']})")
  energy = report.get("assumptions", {}).get("energy_method")
  if energy:
    lines.append(f"energy method: {energy}")
  return "\n".join(lines)


def render(workdir: str, out_path: str | None = None) -> str:
  """Draws the curves and the meter summary; returns the PNG's path."""
  root = storage.absolute(workdir)
  metrics_path = root / "metrics.jsonl"
  if not metrics_path.is_file():
    raise FileNotFoundError(
      f"{workdir} has no metrics.jsonl ({metrics_path}); pass the --workdir of a training run "
      "(python -m train --workdir DIR writes it)"
    )
  records = read_metrics(metrics_path)
  if not records:
    raise ValueError(f"{metrics_path} holds no metrics yet; run at least log.every steps")
  report_path = root / "report.json"
  report = json.loads(report_path.read_text()) if report_path.is_file() else None

  matplotlib.use("Agg")  # files only: never needs a display
  from matplotlib import pyplot as plt  # noqa: PLC0415 - after choosing the backend

  fig, axes = plt.subplots(2, 2, figsize=(13, 9))
  for ax, (title, ylabel, keys) in zip(axes.flat, CURVES, strict=False):
    for key, label in keys:
      steps, values = series(records, key)
      if steps:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend()
  meter_ax = axes.flat[3]
  meter_ax.axis("off")
  meter_ax.set_title("Meter (report.json)")
  meter_ax.text(
    0.0,
    1.0,
    summary_text(report),
    va="top",
    ha="left",
    family="monospace",
    fontsize=7,
    transform=meter_ax.transAxes,
    wrap=True,
  )
  fig.suptitle(os.fspath(root))
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  out_path = out_path or os.fspath(root / "report.png")
  storage.write_atomic(storage.absolute(out_path), png.getvalue())
  return out_path


USAGE = "usage: python -m train.report DIR"


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2:
    return command.error(USAGE)
  try:
    path = render(argv[1])
  except (FileNotFoundError, ValueError) as e:
    return command.error(e)
  print(path)
  return command.EXIT_OK


if __name__ == "__main__":
  command.run(main, usage=USAGE, multi_process=False, positional=1)
