"""End to end through the command line: train, resume, bad input."""

import json
import os
import shutil

import pytest
from cli_helpers import read_metrics, run_train, train_losses


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
  workdir = str(tmp_path_factory.mktemp("full"))
  result = run_train(workdir, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def test_train_writes_the_work_directory(full_run):
  workdir, result = full_run
  records = read_metrics(workdir)
  losses = train_losses(records)
  assert sorted(losses) == [5, 10, 15, 20]
  assert losses[20] < losses[5]
  evals = [r for r in records if "eval/loss" in r]
  assert [r["step"] for r in evals] == [10, 20]
  assert all(r["eval/bits_per_byte"] > 0 for r in evals)
  assert all(
    r["perf/tokens_per_second"] > 0 and 0 < r["perf/mfu"] < 1 for r in records if "perf/mfu" in r
  )
  report = json.load(open(os.path.join(workdir, "report.json")))
  for key in (
    "params",
    "flops_per_token",
    "tokens",
    "total_flops",
    "wall_time_s",
    "device_hours",
    "mfu_mean",
    "energy_kwh",
    "co2e_kg",
    "assumptions",
  ):
    assert key in report, key
  assert report["tokens"] == 20 * 8 * 32
  assert report["total_flops"] == report["tokens"] * report["flops_per_token"]
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["train"]["steps"] == 20
  assert "mesh: data=1 × fsdp=8 × tensor=1" in result.stderr


def test_resume_matches_uninterrupted_run(full_run, tmp_path, cache_dir):
  workdir, _ = full_run
  reference = train_losses(read_metrics(workdir))
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  # Forget everything after step 10, as if the run had died there.
  shutil.rmtree(os.path.join(resumed, "checkpoints", "20"))
  result = run_train(resumed, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed" in result.stderr and "at step 10" in result.stderr
  records = read_metrics(resumed)
  steps = [r["step"] for r in records]
  assert steps == sorted(steps)  # no duplicated or reordered lines after the resume
  assert train_losses(records) == reference  # bit for bit


def test_finished_run_is_not_trained_again(full_run, cache_dir, tmp_path):
  workdir, _ = full_run
  copy = str(tmp_path / "again")
  shutil.copytree(workdir, copy)
  result = run_train(copy, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert train_losses(read_metrics(copy)) == train_losses(read_metrics(workdir))


def test_changed_model_is_refused_unless_allowed(full_run, cache_dir, tmp_path):
  workdir, _ = full_run
  copy = str(tmp_path / "changed")
  shutil.copytree(workdir, copy)
  result = run_train(copy, "--config.model.qk_norm=True", cache_dir=cache_dir)
  assert result.returncode == 2
  assert "model.qk_norm=False in the checkpoint, True now" in result.stderr
  assert "allow_mismatch" in result.stderr
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == sorted(
    os.listdir(os.path.join(workdir, "checkpoints"))
  )


def test_a_checkpoint_that_does_not_fit_is_not_quarantined(full_run, cache_dir, tmp_path):
  # Allowed past the metadata check, the restore itself fails on shapes: that is the model's
  # problem, not the checkpoint's, so the error is raised and the checkpoint stays put.
  workdir, _ = full_run
  copy = str(tmp_path / "wider")
  shutil.copytree(workdir, copy)
  result = run_train(
    copy,
    "--config.model.mlp_dim=96",
    "--config.checkpoint.allow_mismatch=True",
    cache_dir=cache_dir,
  )
  assert result.returncode != 0
  assert "shape" in result.stderr.lower()
  assert "is corrupt" not in result.stderr
  assert not os.path.exists(os.path.join(copy, "checkpoints_corrupt"))
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == sorted(
    os.listdir(os.path.join(workdir, "checkpoints"))
  )


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      ["--config.train.batch_size=12"],
      "train.batch_size=12 is not divisible by the data-parallel size 8",
    ),
    (["--config.mesh.fsdp=3"], "has 3 devices but 8 devices are available"),
    (
      ["--config.model.num_kv_heads=3"],
      "model.num_heads=4 is not divisible by model.num_kv_heads=3",
    ),
    (
      ["--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.model.num_kv_heads=1"],
      "model.num_kv_heads=1 is not divisible by 2",
    ),
    (["--config.model.mlp=relu"], "model.mlp='relu' is not one of"),
    (["--config.optim.schedule=step"], "optim.schedule='step' is not one of"),
  ],
)
def test_bad_config_is_a_clear_error_before_compiling(overrides, message, tmp_path, cache_dir):
  result = run_train(str(tmp_path / "w"), *overrides, cache_dir=cache_dir)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_unknown_key_and_bad_workdir(tmp_path, cache_dir):
  result = run_train(str(tmp_path / "w"), "--config.train.stepz=3", cache_dir=cache_dir)
  assert result.returncode != 0 and "stepz" in result.stderr
  result = run_train(str(tmp_path / "w"), "--config.train.steps=abc", cache_dir=cache_dir)
  assert result.returncode != 0 and "train.steps" in result.stderr
  a_file = tmp_path / "file"
  a_file.write_text("x")
  result = run_train(str(a_file), cache_dir=cache_dir)
  assert result.returncode == 2 and "is a file, not a directory" in result.stderr
