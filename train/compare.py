"""Several runs' loss curves in one picture (``python -m train.report DIR_A DIR_B ... --out PNG``).

Each run's train and eval loss on shared axes, named by ``--labels`` or by its ``model.quant``
(from ``DIR/config.json``), or by the directory's name where those would not tell the runs apart;
below, each later run's eval loss relative to the first run's, in %, at the eval steps they share.
The text summary gives each run's final eval loss and its difference from the first run's.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

from input_pipeline.host import storage
from train.metrics_writer import read_run, series


@dataclass(frozen=True)
class Run:
  label: str
  train: tuple[list[int], list[float]]  # (steps, train/loss)
  eval: tuple[list[int], list[float]]  # (steps, eval/loss)

  @property
  def final_eval(self) -> tuple[int, float] | None:
    """(step, loss) of the last eval; None for a run that logged none."""
    steps, losses = self.eval
    return (steps[-1], losses[-1]) if steps else None


def _quant(workdir: str) -> str | None:
  """The run's model.quant as its config.json records it (None without one)."""
  path = storage.absolute(workdir) / "config.json"
  if not path.is_file():
    return None
  return json.loads(path.read_text()).get("model", {}).get("quant")


def default_labels(workdirs: Sequence[str]) -> list[str]:
  """Each run's model.quant; the directories' names where those are missing or not distinct."""
  quants = [_quant(w) for w in workdirs]
  if None not in quants and len(set(quants)) == len(quants):
    return quants
  return [os.path.basename(os.path.normpath(w)) for w in workdirs]


def load_runs(workdirs: Sequence[str], labels: Sequence[str] | None = None) -> list[Run]:
  """The runs' loss curves; a ValueError where labels and runs differ in number."""
  if labels is not None and len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels ({', '.join(labels)}) for {len(workdirs)} runs")
  runs = []
  for workdir, label in zip(workdirs, labels or default_labels(workdirs), strict=True):
    records = read_run(workdir)
    runs.append(Run(label, series(records, "train/loss"), series(records, "eval/loss")))
  return runs


def relative_eval(base: Run, other: Run) -> tuple[list[int], list[float]]:
  """(steps, %) of other's eval loss over base's, at the eval steps both logged."""
  base_at = dict(zip(*base.eval, strict=True))
  steps, percent = [], []
  for step, loss in zip(*other.eval, strict=True):
    if step in base_at:
      steps.append(step)
      percent.append(100.0 * (loss - base_at[step]) / base_at[step])
  return steps, percent


def summary(runs: Sequence[Run]) -> str:
  """One line per run: its final eval loss (and step), and how far from the first run's."""
  base = runs[0].final_eval
  lines = []
  for run in runs:
    final = run.final_eval
    if final is None:
      lines.append(f"{run.label}: no eval loss")
      continue
    line = f"{run.label}: final eval loss {final[1]:.4f} at step {final[0]}"
    if run is not runs[0] and base is not None:
      line += f" ({100.0 * (final[1] - base[1]) / base[1]:+.2f}% vs {runs[0].label}"
      line += ")" if final[0] == base[0] else f" at step {base[0]})"
    lines.append(line)
  return "\n".join(lines)


def render(runs: Sequence[Run], out_path: str, dpi: int = 80) -> str:
  """Draws the runs' losses and their eval differences to ``out_path`` (a PNG); returns it."""
  matplotlib.use("Agg")  # files only: never needs a display
  from matplotlib import pyplot as plt  # noqa: PLC0415 - after choosing the backend

  fig, (losses, diffs) = plt.subplots(
    2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
  )
  for i, run in enumerate(runs):
    color = f"C{i}"
    losses.plot(*run.train, color=color, alpha=0.6, label=f"{run.label} train")
    losses.plot(*run.eval, color=color, marker="o", linestyle="--", label=f"{run.label} eval")
    if i:
      steps, percent = relative_eval(runs[0], run)
      diffs.plot(steps, percent, color=color, marker="o", label=f"{run.label} vs {runs[0].label}")
  losses.set(title="Loss", ylabel="nats / token")
  diffs.axhline(0.0, color="gray", linewidth=0.8)
  diffs.set(xlabel="step", ylabel="eval loss difference (%)")
  for ax in (losses, diffs):
    ax.grid(alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize=8)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=dpi)
  plt.close(fig)
  path = storage.absolute(out_path)
  path.parent.mkdir(parents=True, exist_ok=True)
  storage.write_atomic(path, png.getvalue())
  return out_path
