"""``python -m train.report DIR``: the run's curves and meter summary, drawn to ``DIR/report.png``;
``python -m train.report DIR_A DIR_B ... --out PNG``: their loss curves together (train/compare.py).

Reads ``DIR/metrics.jsonl`` (train and eval loss, tokens/s and MFU per logged step) and, when the
run has finished, ``DIR/report.json`` (the meter): where the wall time went is one stacked bar
(productive steps, then each loss of goodput, largest first), above the meter's figures. Drawn
with matplotlib's Agg backend: no display.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib
from absl import flags

from input_pipeline.host import command, storage
from train import compare
from train.metrics_writer import read_run, series

CURVES = (  # (panel title, y label, [(metrics key, legend label)])
  ("Loss", "nats / token", [("train/loss", "train"), ("eval/loss", "eval")]),
  ("Throughput", "tokens / s", [("perf/tokens_per_second", "train")]),
  ("Model FLOPs utilisation", "fraction of measured peak", [("perf/mfu", "MFU")]),
)


WALL_PARTS = {  # goodput's names -> the bar's labels
  "productive": "productive steps",
  "compile": "compile",
  "checkpoint": "checkpoint",
  "input_wait": "input wait",
  "eval": "eval",
  "restore_or_init": "restore / init",
  "data": "data preparation",
  "redone_steps": "redone steps",
  "other": "other",
}


def wall_split(report: dict[str, Any] | None) -> list[tuple[str, float]]:
  """(label, seconds) of the run's wall time: productive steps first, then each loss, largest
  first; empty for a report without goodput (older or unfinished runs)."""
  goodput = (report or {}).get("goodput")
  if not isinstance(goodput, dict) or "productive_s" not in goodput:
    return []
  parts = [(WALL_PARTS["productive"], float(goodput["productive_s"]))]
  lost = sorted(goodput.get("lost_s", {}).items(), key=lambda item: -item[1])
  parts += [(WALL_PARTS.get(name, name), float(seconds)) for name, seconds in lost if seconds > 0]
  return parts


def restart_note(report: dict[str, Any] | None) -> str:
  """Where this attempt's state came from and what that cost, e.g. "resumed from the local tier
  at step 6, 2 steps redone"; "" for a fresh start."""
  goodput = (report or {}).get("goodput") or {}
  tier = goodput.get("restored_from", "none")
  if tier == "none":
    return ""
  return (
    f"resumed from the {tier} tier at step {goodput.get('restarted_from_step', 0)}, "
    f"{goodput.get('redone_steps', 0)} steps redone"
  )


def _draw_wall_bar(ax, parts: list[tuple[str, float]], note: str = "") -> None:
  total = sum(seconds for _, seconds in parts) or 1.0
  left = 0.0
  colors = ["tab:green", "tab:orange", "tab:blue", "tab:red", "tab:purple", "tab:brown"]
  colors += ["tab:pink", "tab:gray", "tab:olive"]
  for (label, seconds), color in zip(parts, colors, strict=False):
    share = seconds / total
    ax.barh(0, share, left=left, color=color, label=f"{label} {seconds:.1f} s ({share:.0%})")
    if share > 0.08:
      ax.text(left + share / 2, 0, f"{share:.0%}", ha="center", va="center", fontsize=8)
    left += share
  ax.set(xlim=(0, 1), yticks=[], xticks=[])
  ax.set_title(
    f"Where the {total:.1f} s of wall time went (report.json goodput)"
    + (f"\n{note}" if note else "")
  )
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=7, frameon=False)


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
  records = read_run(workdir)
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
  panel = axes.flat[3]
  panel.axis("off")
  parts = wall_split(report)
  if parts:
    _draw_wall_bar(panel.inset_axes([0.0, 0.82, 1.0, 0.1]), parts, restart_note(report))
  panel.text(
    0.0,
    0.52 if parts else 1.0,
    summary_text(report),
    va="top",
    ha="left",
    family="monospace",
    fontsize=6 if parts else 7,
    transform=panel.transAxes,
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


USAGE = (
  "usage: python -m train.report DIR [--out PNG]\n"
  "       python -m train.report DIR_A DIR_B [...] --out PNG [--labels A,B,...]"
)
MAX_RUNS = 10  # runs in one comparison: matplotlib's ten default colours

_OUT = flags.DEFINE_string("out", None, "The PNG to draw (one DIR: default DIR/report.png).")
_LABELS = flags.DEFINE_list(
  "labels", None, "Several DIRs: their legend names (default: model.quant or the DIR's name)."
)


def main(argv: Sequence[str], out: str | None = None, labels: Sequence[str] | None = None) -> int:
  """One DIR: its report.png. Several: their loss curves in ``out``, and a summary printed."""
  workdirs = argv[1:]
  if not workdirs or (len(workdirs) > 1 and not out):
    code = command.error("give one DIR, or several DIRs and --out PNG")
    print(USAGE, file=sys.stderr)
    return code
  try:
    if len(workdirs) == 1:
      print(render(workdirs[0], out))
      return command.EXIT_OK
    runs = compare.load_runs(workdirs, labels)
    path = compare.render(runs, out)
  except (FileNotFoundError, ValueError) as e:
    return command.error(e)
  print(compare.summary(runs))
  print(path)
  return command.EXIT_OK


if __name__ == "__main__":
  command.run(
    lambda argv: main(argv, _OUT.value, _LABELS.value),
    usage=USAGE,
    multi_process=False,
    positional=MAX_RUNS,
  )
