"""``python -m train.report DIR`` draws a valid PNG, and a DIR without metrics is a clear error;
``python -m train.report DIR_A DIR_B --out PNG`` draws their losses together and sums them up."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from train import compare, metrics_writer, report
from train.meter import energy
from train.meter import run_meter as meter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclasses.dataclass
class FakeDevice:
  platform: str = "cpu"
  device_kind: str = "cpu"


def _write_run(workdir) -> None:
  lines = []
  for step in range(5, 45, 5):
    lines.append(
      {
        "step": step,
        "train/loss": 5.0 - step / 20,
        "perf/tokens_per_second": 900.0 + step,
        "perf/mfu": 0.1 + step / 1000,
      }
    )
    if step % 20 == 0:
      lines.append({"step": step, "eval/loss": 5.1 - step / 20, "eval/perplexity": 9.0})
  lines.append({"step": 45, "train/loss": "nan"})  # NaNs are stored as strings: skipped
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn')
  m = meter.Meter(
    flops_per_token=1000, peak_flops_per_second=1e9, energy_span=energy.EnergySpan(None)
  )
  m.tokens = 40_000
  m.record_window(1000, 1.0)
  run_report = m.report(
    params=10,
    params_nonembedding=5,
    devices=[FakeDevice()],
    pue=1.1,
    grid_kg_per_kwh=0.4,
    power_override=0.0,
    wall_seconds=60.0,
  )
  (workdir / "report.json").write_text(json.dumps(run_report))


def test_report_png_is_written_and_valid(tmp_path):
  _write_run(tmp_path)
  assert report.main(["report", str(tmp_path)]) == 0
  data = (tmp_path / "report.png").read_bytes()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
  assert data[12:16] == b"IHDR" and int.from_bytes(data[16:20], "big") == 1300  # 13 in × 100 dpi


def test_series_skips_missing_and_non_finite_values(tmp_path):
  _write_run(tmp_path)
  records = metrics_writer.read_metrics(str(tmp_path / "metrics.jsonl"))
  steps, values = report.series(records, "train/loss")
  assert steps == list(range(5, 45, 5)) and values[0] == pytest.approx(4.75)
  assert report.series(records, "eval/loss")[0] == [20, 40]


def test_summary_shows_units_and_sources(tmp_path):
  _write_run(tmp_path)
  text = report.summary_text(json.loads((tmp_path / "report.json").read_text()))
  assert "energy_kwh:" in text and "kWh (estimated)" in text and "s (measured)" in text
  assert "no report.json" in report.summary_text(None)


def test_workdir_without_metrics_is_a_clear_error(tmp_path, capsys):
  with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
    report.render(str(tmp_path))
  assert report.main(["report", str(tmp_path)]) == 2
  assert "has no metrics.jsonl" in capsys.readouterr().err
  assert not (tmp_path / "report.png").exists()


def test_report_without_report_json_still_draws_the_curves(tmp_path):
  _write_run(tmp_path)
  (tmp_path / "report.json").unlink()
  assert report.render(str(tmp_path)).endswith("report.png")


def test_the_wall_time_bar_shows_productive_steps_then_the_largest_losses(tmp_path):
  goodput = {"productive_s": 10.0, "lost_s": {"compile": 2.0, "eval": 5.0, "checkpoint": 0.0}}
  goodput["lost_s"]["redone_steps"] = 3.0
  assert report.wall_split({"goodput": goodput}) == [
    ("productive steps", 10.0),
    ("eval", 5.0),
    ("redone steps", 3.0),
    ("compile", 2.0),
  ]
  assert report.wall_split(None) == [] and report.wall_split({"wall_time_s": 3.0}) == []
  restarted = {"goodput": {"restored_from": "local", "restarted_from_step": 6, "redone_steps": 2}}
  assert report.restart_note(restarted) == "resumed from the local tier at step 6, 2 steps redone"
  assert report.restart_note({"goodput": goodput}) == "" and report.restart_note(None) == ""
  _write_run(tmp_path)
  with_bar = json.loads((tmp_path / "report.json").read_text()) | {"goodput": goodput}
  (tmp_path / "report.json").write_text(json.dumps(with_bar))
  assert report.main(["report", str(tmp_path)]) == 0
  assert (tmp_path / "report.png").read_bytes().startswith(PNG_SIGNATURE)


def _write_losses(workdir, quant: str, evals: dict[int, float]) -> str:
  """A run's config.json and metrics.jsonl: train loss every 50 steps, eval loss at ``evals``."""
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"model": {"quant": quant}}))
  lines = [{"step": step, "train/loss": 4.0 - step / 100} for step in range(50, 300, 50)]
  lines += [{"step": step, "eval/loss": loss} for step, loss in evals.items()]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  return str(workdir)


def _two_runs(tmp_path) -> tuple[str, str]:
  a = _write_losses(tmp_path / "a", "none", {125: 2.0, 250: 1.6})
  b = _write_losses(tmp_path / "b", "fp8", {125: 2.1, 200: 1.8, 250: 1.62})  # 200: only in b
  return a, b


def test_two_runs_are_drawn_together_and_summed_up(tmp_path, capsys):
  a, b = _two_runs(tmp_path)
  png = tmp_path / "out" / "a_vs_b.png"
  assert report.main(["report", a, b], out=str(png)) == 0
  data = png.read_bytes()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
  assert data[12:16] == b"IHDR" and int.from_bytes(data[16:20], "big") == 720  # 9 in × 80 dpi
  out = capsys.readouterr().out.splitlines()
  assert out == [
    "none: final eval loss 1.6000 at step 250",
    "fp8: final eval loss 1.6200 at step 250 (+1.25% vs none)",
    str(png),
  ]
  runs = compare.load_runs([a, b])
  steps, percent = compare.relative_eval(*runs)
  assert steps == [125, 250] and percent == pytest.approx([5.0, 1.25])
  assert not (tmp_path / "a" / "report.png").exists()  # the single-run picture is not drawn


def test_labels_name_the_runs_and_same_quants_fall_back_to_directory_names(tmp_path):
  a, b = _two_runs(tmp_path)
  assert [r.label for r in compare.load_runs([a, b], ["bf16", "fp8 rowwise"])] == [
    "bf16",
    "fp8 rowwise",
  ]
  c = _write_losses(tmp_path / "c", "none", {250: 1.5})
  assert compare.default_labels([a, c]) == ["a", "c"]
  with pytest.raises(ValueError, match="1 labels"):
    compare.load_runs([a, b], ["x"])


def test_a_run_without_metrics_in_a_comparison_is_a_clear_error(tmp_path, capsys):
  a, _ = _two_runs(tmp_path)
  missing = tmp_path / "missing"
  png = tmp_path / "a_vs_missing.png"
  assert report.main(["report", a, str(missing)], out=str(png)) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"loom: error: {missing} has no metrics.jsonl") and err.count("\n") == 1
  assert not png.exists()
  assert report.main(["report", a, a]) == 2  # several DIRs need --out
  assert "several DIRs and --out PNG" in capsys.readouterr().err


def test_the_command_compares_runs_named_by_labels(tmp_path):
  a, b = _two_runs(tmp_path)
  png = tmp_path / "cmp.png"
  result = subprocess.run(
    [sys.executable, "-m", "train.report", a, b, f"--out={png}", "--labels=base,quant"],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert "quant: final eval loss 1.6200 at step 250 (+1.25% vs base)" in result.stdout
  assert png.read_bytes().startswith(PNG_SIGNATURE)
