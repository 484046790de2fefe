"""Weighted mixtures (input_pipeline/mixture.py): proportions, process-count invariance, O(1)
resume, stages, realised shares in the logs and the report, a changed mixture refused."""

import itertools
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import REPO, read_metrics, train_env, train_in_process

import input_pipeline
from configs.default import get_config
from input_pipeline import errors, mixture, mixture_spec
from train.checkpoint.manager import CheckpointMismatchError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = [f"files:{STDLIB / name / '*.py'}" for name in ("json", "email", "asyncio")]
WEIGHTS = (0.5, 0.3, 0.2)
B = 20


def _config(cache_dir, weights=WEIGHTS, stages=()):
  c = get_config()
  c.data.cache_dir = str(cache_dir)
  c.data.mixture = tuple(zip(SOURCES, weights, strict=True))
  c.data.mixture_stages = stages
  c.data.seq_len = 32
  c.data.validation_percent = 20
  return c


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return input_pipeline.build(_config(tmp_path_factory.mktemp("cache"), stages=((100, (0, 0, 1)),)))


def _plan(pipe, step, p=0, count=1):
  mix = pipe.mixture
  rows = [s.num_rows("train") for s in mix.stores]
  return mixture.sample_plan(mix.seed, rows, mix.table, B, step, p, count)


def test_realised_proportions_follow_the_weights_and_the_stages(pipe):
  sources = np.concatenate([_plan(pipe, step)[0] for step in range(100)])  # 2,000 rows
  shares = np.bincount(sources, minlength=3) / sources.size
  np.testing.assert_allclose(shares, WEIGHTS, atol=0.01)
  # Every step alone holds floor or ceil of weight × batch rows of each source.
  for step in range(5):
    counts = np.bincount(_plan(pipe, step)[0], minlength=3)
    assert all(abs(c - w * B) < 1 for c, w in zip(counts, WEIGHTS, strict=True))
  # From step 100 on, the second stage: the third source only.
  assert set(np.concatenate([_plan(pipe, step)[0] for step in range(100, 110)])) == {2}


def test_batches_are_the_same_for_any_process_count(pipe):
  def batch(p, count, step=3):
    it = pipe.train_batches(global_batch_size=B, start_step=step, process_index=p,
                            process_count=count)  # fmt: skip
    return next(it)

  whole = batch(0, 1)
  for count in (2, 4):
    parts = [batch(p, count) for p in range(count)]
    for key, value in whole.items():
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), value)
  # And the rows come from the sources the plan says, in batch order.
  sources, rows = _plan(pipe, 3)
  for i in (0, 7, 19):
    tokens = pipe.mixture.stores[sources[i]].read_rows("train", rows[i : i + 1])[0][0]
    np.testing.assert_array_equal(whole["inputs"][i], tokens[:-1])


def test_resume_reads_the_same_rows_as_an_uninterrupted_run(pipe):
  it = pipe.train_batches(global_batch_size=B, start_step=0, process_index=0, process_count=1)
  uninterrupted = list(itertools.islice(it, 8))
  resumed = pipe.train_batches(global_batch_size=B, start_step=5, process_index=0, process_count=1)
  for expected in uninterrupted[5:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_tokens_consumed_are_counted_per_source(pipe):
  pipe.mixture.tokens[:] = 0
  it = pipe.train_batches(global_batch_size=B, start_step=0, process_index=0, process_count=1)
  batches = list(itertools.islice(it, 10))
  realised = pipe.mixture.realised()
  assert sum(r["tokens"] for r in realised.values()) == sum(b["weights"].sum() for b in batches)
  shares = [realised[s]["share"] for s in SOURCES]
  np.testing.assert_allclose(shares, WEIGHTS, atol=0.03)
  evals = pipe.eval_batches(global_batch_size=B, num_batches=2, process_index=0, process_count=1)
  assert len(evals) == 2 and evals[0]["inputs"].shape == (B, 32)


@pytest.mark.parametrize(
  "mixture_value, stages, message",
  [
    ((("stdlib", 1.0),), (), "two or more distinct sources"),
    ((("stdlib", 1.0), ("stdlib", 2.0)), (), "two or more distinct sources"),
    ((("stdlib", 1.0), (SOURCES[0], -1.0)), (), "must be 2 numbers >= 0"),
    ((("stdlib", 0.0), (SOURCES[0], 0.0)), (), "sum to 0"),
    ((("stdlib", 1.0), (SOURCES[0], 1.0)), ((0, (1, 1)),), "start step 0 must be"),
    ((("stdlib", 1.0), (SOURCES[0], 1.0)), ((10, (1,)),), "at step 10: weights"),
    ("stdlib", (), "must be pairs (source, weight)"),
  ],
)
def test_bad_mixtures_are_clear_errors(mixture_value, stages, message):
  with pytest.raises(errors.DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
    mixture_spec.parse(mixture_value, stages)


def test_a_tokenizer_trained_for_a_mixture_reads_each_source_by_its_weight():
  """SentencePiece trains on a bounded sample: the sources' documents interleave by weight (the
  first source alone had filled it), an exhausted source drops out, a weight of 0 reads none."""

  class Source:
    def __init__(self, name, n, size):
      self.docs = [f"{name}{i}".ljust(size, ".") for i in range(n)]

    def documents(self, split):
      assert split == "train"
      return iter(self.docs)

  sources = [Source("a", 1000, 100), Source("b", 1000, 50), Source("c", 5, 100), Source("d", 9, 1)]
  docs = list(itertools.islice(mixture.tokenizer_documents(sources, (0.6, 0.3, 0.1, 0.0)), 400))
  chars = {k: sum(len(d) for d in docs if d[0] == k) for k in "abcd"}
  assert chars["c"] == 500 and chars["d"] == 0  # c ran out; d has no weight
  assert abs(chars["a"] / (chars["a"] + chars["b"]) - 2 / 3) < 0.01, chars
  assert docs[:3] == [sources[0].docs[0], sources[1].docs[0], sources[2].docs[0]]


def test_a_source_without_validation_rows_is_named(tmp_path):
  """validation_percent=0: the fixed validation batches cannot be drawn; the error names the
  sources (it was an IndexError from the empty split's first row)."""
  c = _config(tmp_path / "cache", weights=(0.5, 0.5, 0.0))
  c.data.validation_percent = 0
  pipe = input_pipeline.build(c)
  with pytest.raises(errors.DataError, match=r"source\(s\) \[.*json.*email.*\] have no valid"):
    pipe.mixture.eval_batches(8, 1, 0, 1)


def test_prepare_reports_each_source_of_a_mixture(tmp_path):
  """python -m input_pipeline.prepare on a mixture: one store per source, each reported, and
  --config.data.verify_store=True verifies as --verify does (it was overridden to False)."""
  mix = f"(('{SOURCES[0]}', 0.5), ('{SOURCES[1]}', 0.5))"
  args = [
    "--config=configs/tiny.py",
    f"--config.data.cache_dir={tmp_path}",
    "--config.data.seq_len=32",
  ]
  done = subprocess.run(
    [sys.executable, "-m", "input_pipeline.prepare", *args, f"--config.data.mixture={mix}",
     "--config.data.verify_store=True"],
    cwd=REPO, env=train_env(1), capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.splitlines()[-1])
  assert result["sources"] == SOURCES[:2] and result["verified"] is True
  assert len(set(result["store"])) == 2 and [os.path.isdir(s) for s in result["store"]] == [1, 1]
  assert all(rows["train"] > 0 for rows in result["rows"])
  assert len(result["packing_efficiency"]) == 2


@pytest.mark.slow
def test_a_run_logs_shares_reports_them_and_refuses_another_mixture(tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  mix = (("stdlib", 0.75), (f"files:{STDLIB / 'json' / '*.py'}", 0.25))
  train_in_process(workdir, cache_dir, {"data.mixture": mix, "train.steps": 10})
  lines = [r for r in read_metrics(workdir) if "train/loss" in r and "event" not in r]
  shares = {k: v for k, v in lines[-1].items() if k.startswith("data/share/")}
  assert len(shares) == 2 and sum(shares.values()) == pytest.approx(1.0)
  assert shares["data/share/stdlib"] == pytest.approx(0.75, abs=0.1)
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert report["data_mixture"]["stdlib"]["weight"] == 0.75
  assert report["data_mixture"]["stdlib"]["share"] == shares["data/share/stdlib"]
  # Other weights on resume: a different data fingerprint, refused unless allowed.
  other = {"data.mixture": ((mix[0][0], 0.5), (mix[1][0], 0.5)), "train.steps": 20}
  with pytest.raises(CheckpointMismatchError, match="data fingerprint") as refused:
    train_in_process(workdir, cache_dir, other)
  assert refused.value.exit_code == 2
  allowed = train_in_process(workdir, cache_dir, {**other, "checkpoint.allow_mismatch": True})
  assert allowed["restarted_from_step"] == 10 and allowed["steps"] == 20
