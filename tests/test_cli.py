"""End to end through the command line: train, resume, bad input.

The run they read is the session's shared tiny run (conftest.py: ``tiny_run``); what a refused
config does in the command (one line, exit 2) is proved in tests/test_config.py, so the values
refused here are checked in this process, before any work, by the same ``train_and_evaluate``.
"""

import json
import logging
import os
import traceback

import pytest
from cli_helpers import TINY_RUN, copy_run, read_metrics, run_train, tiny_config, train_losses

from train import trainer
from train.config import ConfigError


def test_train_writes_the_work_directory(tiny_run):
  workdir, stderr = tiny_run
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
  assert "mesh: stage=1 × data=1 × fsdp=8 × context=1 × expert=1 × tensor=1" in stderr


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tiny_run, tmp_path, cache_dir):
  workdir, _ = tiny_run
  reference = train_losses(read_metrics(workdir))
  # Forget everything after step 10, as if the run had died there.
  resumed = copy_run(workdir, tmp_path / "resumed", 20)
  result = run_train(resumed, *TINY_RUN, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed" in result.stderr and "at step 10" in result.stderr
  records = read_metrics(resumed)
  steps = [r["step"] for r in records]
  assert steps == sorted(steps)  # no duplicated or reordered lines after the resume
  assert train_losses(records) == reference  # bit for bit


def test_finished_run_is_not_trained_again(tiny_run, cache_dir, tmp_path):
  workdir, _ = tiny_run
  copy = copy_run(workdir, tmp_path / "again")
  report = trainer.train_and_evaluate(tiny_config(cache_dir), copy)
  assert report["restarted_from_step"] == 20 and report["tokens"] == 0
  assert train_losses(read_metrics(copy)) == train_losses(read_metrics(workdir))


def test_a_checkpoint_that_does_not_fit_is_not_quarantined(tiny_run, cache_dir, tmp_path, caplog):
  # Allowed past the metadata check, the restore itself fails on shapes: that is the model's
  # problem, not the checkpoint's, so the error is raised and the checkpoint stays put.
  workdir, _ = tiny_run
  copy = copy_run(workdir, tmp_path / "wider")
  caplog.set_level(logging.INFO, logger="loom")
  config = tiny_config(cache_dir, {"model.mlp_dim": 96, "checkpoint.allow_mismatch": True})
  with pytest.raises(Exception) as raised:
    trainer.train_and_evaluate(config, copy)
  assert "shape" in "".join(traceback.format_exception(raised.value)).lower()
  assert "is corrupt" not in caplog.text
  assert not os.path.exists(os.path.join(copy, "checkpoints_corrupt"))
  assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == sorted(
    os.listdir(os.path.join(workdir, "checkpoints"))
  )


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"train.batch_size": 12}, "train.batch_size=12 is not divisible by the data-parallel size 8"),
    ({"mesh.fsdp": 3}, "has 3 devices but 8 devices are available"),
    ({"model.num_kv_heads": 3}, "model.num_heads=4 is not divisible by model.num_kv_heads=3"),
    (
      {"mesh.fsdp": 4, "mesh.tensor": 2, "model.num_kv_heads": 1},
      "model.num_kv_heads=1 is not divisible by 2",
    ),
    ({"model.mlp": "relu"}, "model.mlp='relu' is not one of"),
    ({"optim.schedule": "step"}, "optim.schedule='step' is not one of"),
    ({"model.num_heads": 5}, "model.d_model=32 is not divisible by model.num_heads=5"),
    ({"optim.learning_rate": 0.0}, "optim.learning_rate=0"),
    ({"data.source": "s3://bucket/x"}, "data.source='s3://bucket/x'"),
    ({"checkpoint.save_retries": -1}, "checkpoint.save_retries=-1 must be a non-negative"),
    ({"checkpoint.save_timeout_s": 0}, "checkpoint.save_timeout_s=0 must be a positive"),
  ],
)
def test_bad_config_is_a_clear_error_before_any_work(overrides, message, tmp_path, monkeypatch):
  """One line naming the key, exit code 2 in the command; nothing prepared, compiled or written."""

  def compile_anything(*args, **kwargs):
    raise AssertionError("compiled before the config was checked")

  monkeypatch.setattr(trainer, "build_steps", compile_anything)
  cache, workdir = tmp_path / "cache", tmp_path / "w"
  with pytest.raises(ConfigError) as refused:
    trainer.train_and_evaluate(tiny_config(cache, overrides), str(workdir))
  assert message in str(refused.value) and "\n" not in str(refused.value)
  assert refused.value.exit_code == 2
  assert not cache.exists(), "data was prepared before the config was checked"
  assert not workdir.exists(), "a refused run wrote into its work directory"


def test_a_sample_prompt_the_context_cannot_hold_costs_the_sample_only(tmp_path, cache_dir, caplog):
  """The eval's greedy sample of a prompt longer than the model's context had ended the run with
  a traceback at its first eval, before the checkpoint of the same step."""
  overrides = {"log.sample_prompt": "x" * 100, "checkpoint.every": 2, "train.eval_every": 2}
  with caplog.at_level(logging.WARNING, logger="loom"):
    trainer.train_and_evaluate(
      tiny_config(cache_dir, {**overrides, "train.steps": 2}), str(tmp_path / "run")
    )
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")
  assert "log.sample_prompt: no sample at step 2: prompt 0 is 100 tokens" in caplog.text


def test_each_throughput_window_counts_the_steps_that_ran_in_it(tmp_path, cache_dir, monkeypatch):
  """A log step's metrics are fetched two steps late: its window had counted the two steps
  dispatched since (7 steps for 5 after each start and eval: MFU 40% high there)."""
  from train.meter.run_meter import Meter

  windows = []
  record = Meter.record_window

  def counting(self, tokens, seconds):
    windows.append(tokens)
    return record(self, tokens, seconds)

  monkeypatch.setattr(Meter, "record_window", counting)
  config = tiny_config(cache_dir, {"log.every": 5, "train.eval_every": 10})
  trainer.train_and_evaluate(config, str(tmp_path / "run"))
  step_tokens = config.train.batch_size * config.data.seq_len
  assert windows == [5 * step_tokens] * 4
