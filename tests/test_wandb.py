"""Weights & Biases in offline mode: the run's scalars, resolved config and report.json reach one
W&B run, which a resumed training run continues (read back from W&B's own run files)."""

import glob
import json
import os
import struct

import pytest
from cli_helpers import run_train

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402


def _records(path: str) -> list:
  """The protobuf records of a ``run-<id>.wandb`` file (a 7-byte header, then LevelDB-style log
  blocks of 32 KiB: each record is crc32, length, type, payload; types 1 full, 2-4 split)."""
  data = open(path, "rb").read()
  position, block, out, pending = 7, 32768, [], b""
  while position + 7 <= len(data):
    left = block - position % block
    _, length, kind = struct.unpack("<IHB", data[position : position + 7])
    if left < 7 or (length == 0 and kind == 0):
      position += left  # block trailer or padding
      continue
    chunk = data[position + 7 : position + 7 + length]
    position += 7 + length
    pending = chunk if kind in (1, 2) else pending + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
  return out


def _run_files(workdir: str) -> list[tuple[str, list]]:
  paths = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")))
  return [(path, _records(path)) for path in paths]


def _history_steps(records) -> list[int]:
  steps = []
  for record in records:
    if record.WhichOneof("record_type") == "history":
      items = {
        i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
      }
      if "train/loss" in items:
        steps.append(items["_step"])
  return steps


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, cache_dir, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  workdir = str(tmp_path / "run")
  first = run_train(
    workdir, "--config.train.steps=10", "--config.log.wandb_project=loom-test", cache_dir=cache_dir
  )
  assert first.returncode == 0, first.stderr[-3000:]
  run_id = open(os.path.join(workdir, "wandb_run_id")).read().strip()
  second = run_train(
    workdir, "--config.train.steps=20", "--config.log.wandb_project=loom-test", cache_dir=cache_dir
  )
  assert second.returncode == 0, second.stderr[-3000:]
  runs = _run_files(workdir)
  assert len(runs) == 2 and all(path.endswith(f"run-{run_id}.wandb") for path, _ in runs)
  (_, before), (_, after) = runs
  assert _history_steps(before) == [5, 10] and _history_steps(after) == [15, 20]
  (run_record,) = [r.run for r in before if r.WhichOneof("record_type") == "run"]
  assert run_record.project == "loom-test" and run_record.run_id == run_id
  config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
  assert config["train"]["steps"] == 10 and config["log"]["wandb_project"] == "loom-test"
  # report.json ends the run: as a file of the run, and its numbers as the summary.
  report = json.load(open(os.path.join(workdir, "report.json")))
  saved = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "files", "report.json"))
  assert len(saved) == 2 and json.load(open(max(saved)))["tokens"] == report["tokens"]
  summaries = [r.summary for r in after if r.WhichOneof("record_type") == "summary"]
  summary_keys = {i.key or "/".join(i.nested_key) for s in summaries for i in s.update}
  assert {"eval/loss", "energy_kwh", "goodput/goodput"} <= summary_keys


def test_wandb_off_by_default_writes_nothing_of_it(tiny_run):
  workdir, _ = tiny_run  # the shared tiny run, with the default config's logging
  assert not os.path.exists(os.path.join(workdir, "wandb"))
  assert not os.path.exists(os.path.join(workdir, "wandb_run_id"))
