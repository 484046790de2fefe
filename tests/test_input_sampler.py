"""The step-indexed sampler: pure function of (seed, step), resume, process shares, epochs, eval."""

import itertools
import logging
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import input_pipeline
from configs.default import get_config
from input_pipeline import sampler

JSON_GLOB = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")
B = 8


def _config(cache_dir, **data):
  c = get_config()
  c.data.cache_dir = str(cache_dir)
  c.data.source = f"files:{JSON_GLOB}"
  c.data.seq_len = 32
  c.data.validation_percent = 20
  for key, value in data.items():
    setattr(c.data, key, value)
  return c


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return input_pipeline.build(_config(tmp_path_factory.mktemp("cache")))


def _steps(pipe, n, start=0, p=0, count=1, batch=B):
  it = pipe.train_batches(
    global_batch_size=batch, start_step=start, process_index=p, process_count=count
  )
  return list(itertools.islice(it, n))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys() == set(sampler.BATCH_KEYS)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_are_identical_across_fresh_pipelines(pipe, tmp_path):
  other = input_pipeline.build(_config(tmp_path))  # a separate cache: prepared from scratch
  assert other.fingerprint == pipe.fingerprint
  _assert_same(_steps(pipe, 6), _steps(other, 6))
  batch = _steps(pipe, 1)[0]
  assert batch["inputs"].shape == (B, 32) and batch["weights"].dtype == np.float32


def test_batches_match_the_pure_index_function(pipe):
  rows = pipe.store.num_rows("train")
  for step, batch in enumerate(_steps(pipe, 3)):
    idx = sampler.global_indices(pipe.seed, step, B, rows)
    expect = input_pipeline.packing.make_batch(*pipe.store.read_rows("train", idx))
    _assert_same([batch], [expect])


def test_resume_at_step_equals_running_through(pipe):
  _assert_same(_steps(pipe, 10)[6:], _steps(pipe, 4, start=6))


def test_process_shares_union_is_the_same_global_batch(pipe):
  steps = [0, 3, 50]
  whole = _steps(pipe, 51)
  for count in (1, 2, 4):
    for step in steps:
      parts = [_steps(pipe, 1, start=step, p=p, count=count)[0] for p in range(count)]
      for key in sampler.BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([x[key] for x in parts]), whole[step][key])


def test_each_epoch_visits_every_row_once_in_a_new_order():
  rows, batch = 37, 4  # a batch straddles the epoch boundary
  steps = -(-3 * rows // batch)
  flat = np.concatenate([sampler.global_indices(5, s, batch, rows) for s in range(steps)])
  epochs = [flat[e * rows : (e + 1) * rows] for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(rows))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  other_seed = sampler.global_indices(6, 0, batch, rows)
  assert not np.array_equal(other_seed, flat[:batch])


def test_epoch_boundaries_are_logged(pipe, caplog):
  rows = pipe.store.num_rows("train")
  step = rows // B  # the step during which epoch 1 begins
  with caplog.at_level(logging.INFO, logger="input_pipeline.sampler"):
    _steps(pipe, 2, start=step)
  assert f"epoch 1 begins at step {step}" in caplog.text


def test_eval_batches_are_fixed_and_sharded(pipe):
  first = pipe.eval_batches(global_batch_size=B, num_batches=2, process_index=0, process_count=1)
  again = pipe.eval_batches(global_batch_size=B, num_batches=2, process_index=0, process_count=1)
  _assert_same(first, again)
  assert len(first) == 2
  halves = [
    pipe.eval_batches(global_batch_size=B, num_batches=2, process_index=p, process_count=2)
    for p in range(2)
  ]
  for b in range(2):
    np.testing.assert_array_equal(
      np.concatenate([halves[0][b]["inputs"], halves[1][b]["inputs"]]), first[b]["inputs"]
    )


def test_eval_uses_the_whole_batches_that_exist(pipe, caplog):
  rows = pipe.store.num_rows("validation")
  with caplog.at_level(logging.WARNING, logger="input_pipeline.sampler"):
    got = pipe.eval_batches(global_batch_size=B, num_batches=10_000, process_count=1)
  assert len(got) == rows // B and "instead of the 10000 requested" in caplog.text


def test_eval_split_smaller_than_a_batch_is_an_error(pipe):
  rows = pipe.store.num_rows("validation")
  with pytest.raises(
    input_pipeline.DataError, match=f"has {rows} rows .* fewer than one global batch"
  ):
    pipe.eval_batches(global_batch_size=rows + 1, num_batches=1, process_count=1)


def test_batch_not_divisible_by_process_count(pipe):
  with pytest.raises(ValueError, match="global batch size 6 .* divisible by the process count 4"):
    pipe.train_batches(global_batch_size=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="start_step must be >= 0"):
    pipe.train_batches(global_batch_size=8, start_step=-1, process_count=1)
  with pytest.raises(ValueError, match="process_index=4 must be in"):
    pipe.eval_batches(global_batch_size=8, num_batches=1, process_index=4, process_count=4)
