"""Where metrics go: ``metrics.jsonl``, TensorBoard and a progress line. Only process 0 writes.
``read_run`` and ``series`` read ``metrics.jsonl`` back (train.report, train.compare)."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import secrets
import sys
import time
from typing import Any

from input_pipeline import tensorflow_import
from input_pipeline.host import storage

log = logging.getLogger("loom")


def _clean(value: Any) -> Any:
  value = float(value) if hasattr(value, "__float__") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible as strings
  return value


def read_metrics(path) -> list[dict[str, Any]]:
  """The JSON records of metrics.jsonl; a line torn by a crash is skipped."""
  records = []
  for line in storage.absolute(path).read_text(encoding="utf-8").splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def read_run(workdir) -> list[dict[str, Any]]:
  """The records of a run's ``WORKDIR/metrics.jsonl``; FileNotFoundError (no file) or ValueError
  (no records) with a message naming the path."""
  path = storage.absolute(workdir) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(
      f"{workdir} has no metrics.jsonl ({path}); pass the --workdir of a training run "
      "(python -m train --workdir DIR writes it)"
    )
  records = read_metrics(path)
  if not records:
    raise ValueError(f"{path} holds no metrics yet; run at least log.every steps")
  return records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric, skipping records without it and non-finite values (stored
  as strings)."""
  steps, values = [], []
  for record in records:
    value = record.get(key)
    if isinstance(value, (int, float)) and math.isfinite(value):
      steps.append(int(record["step"]))
      values.append(float(value))
  return steps, values


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard.

  On resume from step S, lines for steps after S (written before a crash, and about to be redone)
  are dropped first, so the file never holds duplicates; a torn last line is dropped too. The
  work directory may be an object store (``input_pipeline/host/storage.py``): the file is then
  rewritten whole (``flush()`` before every checkpoint save), and TensorBoard writes to a local
  mirror that is copied up at the same moments.
  """

  def __init__(
    self,
    workdir,
    *,
    resume_step: int,
    tensorboard: bool,
    enabled: bool,
    wandb_project: str = "",
    config: dict[str, Any] | None = None,
  ):
    self.enabled = enabled
    self.path = storage.absolute(workdir) / "metrics.jsonl"
    self._tb = self._tb_mirror = self._wandb = None
    self.last_logged_step = 0  # the highest step the file held before (a crash's last log)
    if not enabled:
      return
    if wandb_project:
      self._wandb = WandbRun(workdir, wandb_project, config or {})
    kept, self.last_logged_step = _lines_up_to(self.path, resume_step)
    self._log = storage.AppendOnlyLog(self.path, kept)
    if tensorboard:
      tf = self._tf = tensorflow_import.load()  # 2.4 s to import: only when TensorBoard is on

      tb_dir = self.path.parent / "tensorboard"
      if storage.is_remote(tb_dir):
        self._tb_mirror = storage.LocalMirror(tb_dir, prefix="loom-tensorboard-")
        tb_dir = self._tb_mirror.local
      self._tb = tf.summary.create_file_writer(os.fspath(tb_dir))

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _clean(v) for k, v in scalars.items()}}
    self._log.append(json.dumps(record))
    if self._wandb is not None:
      self._wandb.log(record)
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for key, value in record.items():
          if key != "step" and isinstance(value, (int, float)):
            self._tf.summary.scalar(key, value)

  def flush(self) -> None:
    """Makes everything written so far durable (called before each checkpoint save)."""
    if not self.enabled:
      return
    self._log.flush(force=True)
    if self._tb is not None:
      self._tb.flush()
      if self._tb_mirror is not None:
        self._tb_mirror.sync()

  def close(self) -> None:
    if not self.enabled:
      return
    self._log.close()
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      if self._tb_mirror is not None:
        self._tb_mirror.sync()

  def finish(self, report: dict[str, Any] | None = None) -> None:
    """Ends the W&B run (if any), with ``report`` (report.json) as its summary and a file; a
    run that failed passes None and is marked failed."""
    if self._wandb is not None:
      self._wandb.finish(report)
      self._wandb = None


class WandbRun:
  """The run in Weights & Biases (``log.wandb_project``; the [wandb] extra): the same scalars as
  TensorBoard, the resolved config, report.json at the end. The run id is kept in
  ``WORKDIR/wandb_run_id``, so a resumed run continues the same W&B run. W&B keeps only steps
  above the last one it has: the steps a resume redoes reach metrics.jsonl, not W&B, again.
  ``WANDB_MODE=offline`` writes the run under ``WORKDIR/wandb`` for ``wandb sync`` later."""

  def __init__(self, workdir, project: str, config: dict[str, Any]):
    try:
      import wandb  # noqa: PLC0415 (the [wandb] extra)
    except ImportError as e:
      raise ImportError(
        f"log.wandb_project={project!r} needs Weights & Biases: pip install -e '.[wandb]'"
      ) from e
    root = storage.absolute(workdir)
    id_path = root / "wandb_run_id"
    run_id = id_path.read_text().strip() if id_path.exists() else secrets.token_hex(4)
    local = storage.local_scratch(root) if storage.is_remote(root) else pathlib.Path(root)
    local.mkdir(parents=True, exist_ok=True)
    self._run = wandb.init(
      project=project,
      id=run_id,
      resume="allow",
      name=root.name,
      config=config,
      dir=os.fspath(local),
    )
    if not id_path.exists():
      storage.write_atomic(id_path, run_id)
    self.id = run_id

  def log(self, record: dict[str, Any]) -> None:
    scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
    if "event" in record:
      scalars["events"] = 1  # a skip or a rollback, marked on the step
    if scalars:
      self._run.log(scalars, step=int(record["step"]))

  def finish(self, report: dict[str, Any] | None) -> None:
    if report is not None:
      flat = {
        k: v for k, v in report.items() if isinstance(v, int | float) and not isinstance(v, bool)
      }
      flat.update({f"goodput/{k}": v for k, v in report.get("goodput", {}).items()
                   if isinstance(v, int | float)})  # fmt: skip
      self._run.summary.update(flat)
      path = pathlib.Path(self._run.dir) / "report.json"
      path.write_text(json.dumps(report, indent=2, default=str))
      self._run.save(os.fspath(path), base_path=self._run.dir, policy="now")
    self._run.finish(exit_code=0 if report is not None else 1)


def _lines_up_to(path, step: int) -> tuple[list[str], int]:
  """The records of ``path`` for steps <= ``step``, re-serialised (torn lines left out), and
  the highest step the file held."""
  if not path.exists():
    return [], 0
  kept, highest = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line torn by a crash
    highest = max(highest, int(record.get("step", 0)))
    if record.get("step", 0) <= step:
      kept.append(json.dumps(record))
  return kept, highest


def _duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
  """A one-line progress report per log step on process 0: bar, loss, tokens/s, MFU, ETA."""

  def __init__(self, total_steps: int, start_step: int, *, enabled: bool):
    self.total = total_steps
    self.start_step = start_step
    self.enabled = enabled
    self.started = time.perf_counter()

  def update(self, step: int, loss: float, tokens_per_second: float, mfu: float) -> None:
    if not self.enabled:
      return
    done = (step - self.start_step) / max(self.total - self.start_step, 1)
    elapsed = time.perf_counter() - self.started
    eta = elapsed / done * (1 - done) if done > 0 else float("nan")
    filled = int(20 * step / max(self.total, 1))
    bar = "#" * filled + "-" * (20 - filled)
    line = (
      f"[{bar}] step {step}/{self.total}  loss {loss:.4f}  "
      f"{tokens_per_second:,.0f} tok/s  MFU {mfu:.1%}  ETA {_duration(eta)}"
    )
    print(line, file=sys.stderr, flush=True)
