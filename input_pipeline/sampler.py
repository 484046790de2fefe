"""The step-indexed sampler: which stored rows make up step s; the tf.data pipeline that reads them.

Global sample g = s * global_batch + i (i in [0, global_batch)) is row
perm(seed, epoch)[g mod rows] with epoch = g // rows, where perm is the stateless bijection
`tf.random.experimental.index_shuffle` keyed by (seed, epoch). So a batch is a pure function of
(seed, step), every epoch visits every row exactly once in a fresh order, and resuming at step s
costs nothing: the pipeline simply starts counting at s. Process p of P reads only samples
[p * B / P, (p + 1) * B / P) of each step, so the union over processes is the same global batch for
any P.
"""

import logging
from collections.abc import Iterator

import numpy as np

from input_pipeline import packing, tensorflow_import
from input_pipeline.errors import DataError
from input_pipeline.store import Store

tf = tensorflow_import.load()

_log = logging.getLogger(__name__)

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")
BATCH_DTYPES = (tf.int32, tf.int32, tf.int32, tf.int32, tf.float32)


def check_share(global_batch_size: int, process_index: int, process_count: int) -> int:
  """This process's rows per step; raises if the global batch cannot be split evenly."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} must be >= 1 and divisible by the process count "
      f"{process_count} (each process reads an equal share)"
    )
  return global_batch_size // process_count


def global_samples(
  global_batch_size: int,
  start_step: int,
  stop_step: int | None,
  process_index: int,
  process_count: int,
) -> tf.data.Dataset:
  """Global sample indices g = step * global_batch_size + i (int64) of this process's samples of
  steps [start_step, stop_step), in order; stop_step None = endless."""
  local = global_batch_size // process_count
  offset = process_index * local

  @tensorflow_import.as_written
  def global_index(k):  # k counts this process's samples
    return (k // local) * global_batch_size + offset + k % local

  stop = np.iinfo(np.int64).max if stop_step is None else stop_step * local
  return tf.data.Dataset.range(start_step * local, stop).map(global_index)


def _sample_dataset(
  seed: int,
  num_rows: int,
  global_batch_size: int,
  start_step: int,
  stop_step: int | None,
  process_index: int,
  process_count: int,
) -> tf.data.Dataset:
  """Row indices (int64 scalars) of this process's samples of steps [start_step, stop_step);
  stop_step None = endless."""
  rows = tf.constant(num_rows, tf.int64)
  seed_t = tf.constant(seed, tf.int64)

  @tensorflow_import.as_written
  def row_of(g):
    epoch = g // rows
    return tf.random.experimental.index_shuffle(
      g % rows, seed=tf.stack([seed_t, epoch]), max_index=rows - 1
    )

  ds = global_samples(global_batch_size, start_step, stop_step, process_index, process_count)
  return ds.map(row_of, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def global_indices(
  seed: int,
  step: int,
  global_batch_size: int,
  num_rows: int,
  process_index: int = 0,
  process_count: int = 1,
) -> np.ndarray:
  """The stored rows this process reads at `step` (the same function the pipeline runs)."""
  check_share(global_batch_size, process_index, process_count)
  ds = _sample_dataset(
    seed, num_rows, global_batch_size, step, step + 1, process_index, process_count
  )
  return np.fromiter(ds.as_numpy_iterator(), np.int64)


def _reader(store: Store, split: str):
  def read(rows_B: np.ndarray):
    batch = packing.make_batch(*store.read_rows(split, rows_B))
    return tuple(batch[k] for k in BATCH_KEYS)

  return read


def train_dataset(
  store: Store,
  seed: int,
  global_batch_size: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> tf.data.Dataset:
  """This process's batches of steps start_step, start_step + 1, ... as a tf.data pipeline."""
  local = check_share(global_batch_size, process_index, process_count)
  seq_len = store.manifest["seq_len"]
  read = _reader(store, "train")

  @tensorflow_import.as_written
  def load(rows_B):
    arrays = tf.numpy_function(read, [rows_B], BATCH_DTYPES, stateful=False)
    return {
      k: tf.ensure_shape(a, [local, seq_len]) for k, a in zip(BATCH_KEYS, arrays, strict=True)
    }

  ds = _sample_dataset(
    seed,
    store.num_rows("train"),
    global_batch_size,
    start_step,
    None,
    process_index,
    process_count,
  )
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return without_autotune(ds.prefetch(PREFETCH_BATCHES))


# Batches read ahead of the step that takes them; a fixed depth, not tf.data's autotuning.
PREFETCH_BATCHES = 2


def without_autotune(ds: tf.data.Dataset) -> tf.data.Dataset:
  """``ds`` without tf.data's autotuning: the map's parallelism becomes the host's cores and no
  autotune thread runs. That thread sleeps between optimisations for a period that grows with
  the iterator's age, and the iterator's destructor waits for it: 43-48 s at the end of the
  default run (docs/platform-facts.md)."""
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)


def train_iterator(
  store: Store,
  seed: int,
  global_batch_size: int,
  start_step: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """Numpy batches of steps start_step, ...; logs where each epoch of the train rows begins.

  Arguments are checked here, at the call, not at the first batch.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  rows = store.num_rows("train")
  if store.remote:
    return _log_epochs(
      _remote_batches(store, seed, global_batch_size, start_step, process_index, process_count),
      rows,
      global_batch_size,
      start_step,
    )
  ds = train_dataset(store, seed, global_batch_size, start_step, process_index, process_count)
  _log.info(
    "Train data: %d rows, global batch %d (%d per process x %d), starting at step %d in epoch %d",
    rows,
    global_batch_size,
    global_batch_size // process_count,
    process_count,
    start_step,
    start_step * global_batch_size // rows,
  )
  return _log_epochs(ds.as_numpy_iterator(), rows, global_batch_size, start_step)


def _remote_batches(store, seed, global_batch_size, start_step, process_index, process_count):
  """Batches of a store on an object store: tf.data computes the row indices, and the rows are
  fetched on the caller's thread (range requests, all of a batch's at once). fsspec's client
  inside tf.data's own threads deadlocked at interpreter exit; here the fetch overlaps the
  device's step anyway, since the loop does not wait for the device between log steps."""
  local = check_share(global_batch_size, process_index, process_count)
  ds = _sample_dataset(
    seed, store.num_rows("train"), global_batch_size, start_step, None, process_index,
    process_count,
  )  # fmt: skip
  read = _reader(store, "train")
  for rows_B in ds.batch(local, drop_remainder=True).prefetch(2).as_numpy_iterator():
    yield dict(zip(BATCH_KEYS, read(rows_B), strict=True))


def _log_epochs(batches, rows: int, global_batch_size: int, step: int):
  for batch in batches:
    first, last = step * global_batch_size, (step + 1) * global_batch_size - 1
    for epoch in range(max(1, -(-first // rows)), last // rows + 1):
      _log.info("Train data: epoch %d begins at step %d", epoch, step)
    yield batch
    step += 1


def eval_batches(
  store: Store,
  global_batch_size: int,
  num_batches: int,
  process_index: int,
  process_count: int,
) -> list[dict[str, np.ndarray]]:
  """The first num_batches whole global batches of validation rows, in stored order."""
  local = check_share(global_batch_size, process_index, process_count)
  rows = store.num_rows("validation")
  if rows < global_batch_size:
    raise DataError(
      f"the validation split of store {store.path} has {rows} rows of seq_len + 1 tokens, fewer "
      f"than one global batch of {global_batch_size}; lower the batch size, raise "
      "data.validation_percent, or use a larger corpus"
    )
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1, got {num_batches}")
  available = rows // global_batch_size
  if available < num_batches:
    _log.warning(
      "Validation split has %d rows: %d whole batches of %d instead of the %d requested",
      rows,
      available,
      global_batch_size,
      num_batches,
    )
  read = _reader(store, "validation")
  out = []
  for b in range(min(num_batches, available)):
    rows_B = b * global_batch_size + process_index * local + np.arange(local)
    out.append(dict(zip(BATCH_KEYS, read(rows_B), strict=True)))
  return out
