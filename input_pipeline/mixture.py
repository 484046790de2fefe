"""Weighted mixtures of sources: ``data.mixture = (("stdlib", 0.7), ("files:/code/*.py", 0.3))``.

Each source is prepared into its own store (shared with single-source runs of it) with one
tokenizer. Global sample g = s * global_batch + i of step s draws its source from the weights of
the stage holding s (``data.mixture_stages``: (start step, weights) pairs) by stratified
sampling with counter-based generators keyed on (seed, s, i) -- the step's rows in an order from
``index_shuffle`` keyed on (seed, s), one ``stateless_uniform`` (Philox) offset per step -- so
every step holds floor or ceil of weight × batch rows of each source; then it reads row
perm_k(seed, epoch)[g mod rows_k] of that source k, a permutation of k's own rows indexed by the
same g. So a batch stays a pure function of (seed, step, process) for any process count, resume
is O(1), and each source's rows come in a fresh order every epoch of that source (rows drawn for
another source at some g are simply not used at that g).

The realised share of each source (tokens seen) is counted on the host as batches are consumed
and reported per source; the pipeline's fingerprint covers every source's store, the weights and
the stages, so a run resumed with another mixture is refused unless allowed. The config's values
are read and checked by ``mixture_spec.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Sequence

import numpy as np

from input_pipeline import errors, packing, sampler, tensorflow_import
from input_pipeline.store import Store

tf = tensorflow_import.load()

_log = logging.getLogger(__name__)

_SOURCE_SALT = 0x5EED  # keeps the source draw independent of the row permutations' seeds


def fingerprint(stores: Sequence[Store], specs: Sequence[str], table) -> str:
  inputs = {
    "sources": [[spec, store.fingerprint] for spec, store in zip(specs, stores, strict=True)],
    "stages": [[start, [round(float(w), 12) for w in weights]] for start, weights in table],
  }
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _sample_dataset(
  seed: int,
  rows_per_source: Sequence[int],
  table,
  global_batch_size: int,
  start_step: int,
  stop_step: int | None,
  process_index: int,
  process_count: int,
) -> tf.data.Dataset:
  """(source, row) of this process's samples of steps [start_step, stop_step), in order."""
  starts = tf.constant([start for start, _ in table], tf.int64)
  cumulative = tf.constant(np.stack([np.cumsum(w) for _, w in table]), tf.float64)
  seed_t = tf.constant(seed, tf.int64)

  @tensorflow_import.as_written
  def sample_of(g):
    step = g // global_batch_size
    stage = tf.reduce_sum(tf.cast(starts <= step, tf.int32)) - 1
    # Stratified: the step's rows, in an order keyed on (seed, step), share one uniform offset,
    # so each source gets floor or ceil of its weight × batch rows at every step (no drift).
    step_seed = tf.stack([seed_t ^ _SOURCE_SALT, step])
    place = tf.random.experimental.index_shuffle(
      g % global_batch_size, seed=step_seed, max_index=global_batch_size - 1
    )
    offset_u = tf.random.stateless_uniform([], seed=step_seed, dtype=tf.float64)
    u = (tf.cast(place, tf.float64) + offset_u) / global_batch_size
    # The source whose cumulative weight first exceeds u (never past the last one).
    source = tf.minimum(
      tf.reduce_sum(tf.cast(cumulative[stage] <= u, tf.int32)), len(rows_per_source) - 1
    )
    rows = []
    for index, count in enumerate(rows_per_source):
      count = tf.constant(count, tf.int64)
      rows.append(
        tf.random.experimental.index_shuffle(
          g % count, seed=tf.stack([seed_t + index, g // count]), max_index=count - 1
        )
      )
    return source, tf.gather(tf.stack(rows), source)

  ds = sampler.global_samples(
    global_batch_size, start_step, stop_step, process_index, process_count
  )
  return ds.map(sample_of, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def sample_plan(
  seed: int,
  rows_per_source: Sequence[int],
  table,
  global_batch_size: int,
  step: int,
  process_index: int = 0,
  process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """(source, row) arrays of this process's samples at ``step`` (what the pipeline reads)."""
  sampler.check_share(global_batch_size, process_index, process_count)
  ds = _sample_dataset(
    seed, rows_per_source, table, global_batch_size, step, step + 1, process_index, process_count
  )
  pairs = np.array(list(ds.as_numpy_iterator()), np.int64).reshape(-1, 2)
  return pairs[:, 0], pairs[:, 1]


def _read(stores: Sequence[Store], split: str, sources_B: np.ndarray, rows_B: np.ndarray):
  """Rows from several stores, in batch order, as one packed batch (tuple of arrays)."""
  parts = [None] * len(sources_B)
  for k, store in enumerate(stores):
    where = np.nonzero(sources_B == k)[0]
    if where.size:
      arrays = store.read_rows(split, rows_B[where])
      for j, position in enumerate(where):
        parts[position] = tuple(a[j] for a in arrays)
  stacked = [np.stack(column) for column in zip(*parts, strict=True)]
  batch = packing.make_batch(*stacked)
  return tuple(batch[key] for key in sampler.BATCH_KEYS)


class Mixture:
  """The train and validation batches of a mixture, and the realised share of each source."""

  def __init__(self, stores: Sequence[Store], specs: Sequence[str], table, seed: int):
    self.stores, self.specs, self.table, self.seed = list(stores), list(specs), table, seed
    self.fingerprint = fingerprint(stores, specs, table)
    self.tokens = np.zeros(len(stores), np.int64)  # target tokens consumed, per source

  def weights_at(self, step: int) -> np.ndarray:
    starts = [start for start, _ in self.table]
    return self.table[int(np.searchsorted(starts, step, side="right")) - 1][1]

  def realised(self) -> dict[str, dict[str, float]]:
    total = max(int(self.tokens.sum()), 1)
    return {
      spec: {"tokens": int(tokens), "share": float(tokens) / total}
      for spec, tokens in zip(self.specs, self.tokens, strict=True)
    }

  def consumption(self, step: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """What this process has consumed since it started: ``data/share/<source>`` log values (the
    share of the target tokens from each source) and, for the run's report, each source's
    tokens, share and weight at ``step``."""
    realised = self.realised()
    weights = self.weights_at(step)
    report = {
      spec: dict(counts, weight=float(weight))
      for (spec, counts), weight in zip(realised.items(), weights, strict=True)
    }
    values = {
      f"data/share/{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec)}": counts["share"]
      for spec, counts in realised.items()
    }
    return values, report

  def train_batches(
    self, global_batch_size: int, start_step: int, process_index: int, process_count: int
  ) -> Iterator[dict[str, np.ndarray]]:
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    local = sampler.check_share(global_batch_size, process_index, process_count)
    seq_len = self.stores[0].manifest["seq_len"]
    rows = [store.num_rows("train") for store in self.stores]
    dtypes = (*sampler.BATCH_DTYPES, tf.int32)

    def read(sources_B, rows_B):
      return (*_read(self.stores, "train", sources_B, rows_B), sources_B.astype(np.int32))

    @tensorflow_import.as_written
    def load(sources, rows):
      arrays = tf.numpy_function(read, [sources, rows], dtypes, stateful=False)
      batch = {
        k: tf.ensure_shape(a, [local, seq_len])
        for k, a in zip(sampler.BATCH_KEYS, arrays, strict=False)
      }
      batch["source"] = tf.ensure_shape(arrays[-1], [local])
      return batch

    ds = _sample_dataset(
      self.seed, rows, self.table, global_batch_size, start_step, None, process_index,
      process_count,
    )  # fmt: skip
    ds = ds.batch(local, drop_remainder=True)
    if any(store.remote for store in self.stores):  # fetched on this thread (sampler.py)
      pairs = ds.prefetch(2).as_numpy_iterator()
      batches = (dict(zip((*sampler.BATCH_KEYS, "source"), read(*p), strict=True)) for p in pairs)
    else:
      ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
      ds = sampler.without_autotune(ds.prefetch(sampler.PREFETCH_BATCHES))
      batches = ds.as_numpy_iterator()
    _log.info(
      "Train data: a mixture of %s, weights %s from step %d (global batch %d)",
      ", ".join(self.specs),
      np.round(self.weights_at(start_step), 4).tolist(),
      start_step,
      global_batch_size,
    )
    for batch in batches:
      sources = batch.pop("source")
      counts = batch["weights"].sum(axis=1)
      self.tokens += np.bincount(sources, weights=counts, minlength=len(self.stores)).astype(
        np.int64
      )
      yield batch

  def eval_batches(
    self, global_batch_size: int, num_batches: int, process_index: int, process_count: int
  ) -> list[dict[str, np.ndarray]]:
    """Fixed validation batches, each row from a source drawn with the last stage's weights
    (keyed on (seed, batch, row)), taking each source's validation rows in stored order."""
    local = sampler.check_share(global_batch_size, process_index, process_count)
    if num_batches < 1:
      raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    weights = np.cumsum(self.table[-1][1])
    rows = [store.num_rows("validation") for store in self.stores]
    generator = np.random.Generator(np.random.Philox(key=[self.seed, _SOURCE_SALT]))
    draws = generator.random((num_batches, global_batch_size))
    sources = np.minimum(np.searchsorted(weights, draws, side="right"), len(rows) - 1)
    empty = [spec for spec, count in zip(self.specs, rows, strict=True) if count == 0]
    if empty and any(np.isin(sources, [self.specs.index(s) for s in empty]).ravel()):
      raise errors.DataError(
        f"data.mixture: source(s) {empty} have no validation rows; raise "
        f"data.validation_percent or give them more text"
      )
    next_row = np.zeros(len(rows), np.int64)
    out = []
    for b in range(num_batches):
      rows_B = np.empty(global_batch_size, np.int64)
      for i, k in enumerate(sources[b]):
        rows_B[i] = next_row[k] % max(rows[k], 1)
        next_row[k] += 1
      mine = slice(process_index * local, (process_index + 1) * local)
      arrays = _read(self.stores, "validation", sources[b][mine], rows_B[mine])
      out.append(dict(zip(sampler.BATCH_KEYS, arrays, strict=True)))
    return out


def tokenizer_documents(sources, weights) -> Iterator[str]:
  """Training text for a tokenizer trained on the mixture: the sources' documents interleaved so
  that each source's share of the characters follows its (first stage's) weight, whichever the
  tokenizer trainer's character budget stops at. Deterministic: the source furthest below its
  share gives the next document; an exhausted source drops out."""
  weights = np.asarray(weights, np.float64)
  documents = [iter(source.documents("train")) for source in sources]
  chars = np.zeros(len(documents))
  live = weights > 0
  while live.any():
    target = weights / weights[live].sum() * chars.sum()
    k = int(np.argmax(np.where(live, target - chars, -np.inf)))
    document = next(documents[k], None)
    if document is None:
      live[k] = False
      continue
    chars[k] += max(len(document), 1)
    yield document
