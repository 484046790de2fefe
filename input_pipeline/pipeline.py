"""``build_local(config)``: source -> tokenizer -> prepared store, on this process alone; the
``Pipeline`` the trainer reads from. ``input_pipeline.build`` (``preparation.py``) calls it once
for all the processes of a run."""

import contextlib
import dataclasses
import functools
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import (
  chat,
  errors,
  mixture,
  mixture_spec,
  preference,
  sampler,
  sources,
  store,
  tensorflow_import,
  tokenizers,
)
from input_pipeline import shares as shares_lib
from input_pipeline.host import storage

tf = tensorflow_import.load()

_log = logging.getLogger(__name__)


class Pipeline:
  """A prepared store and the tokenizer that made it; batches are pure functions of (seed, step)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, prepared: store.Store, seed: int):
    self.tokenizer = tokenizer
    self.store = prepared
    self.seed = seed

  @property
  def fingerprint(self) -> str:
    return self.store.fingerprint

  @property
  def manifest(self) -> dict:
    return self.store.manifest

  @property
  def seq_len(self) -> int:
    return int(self.store.manifest["seq_len"])

  @functools.cached_property
  def bytes_per_token(self) -> float:
    """UTF-8 bytes of text per token over a sample of the validation split (for bits per byte)."""
    rows = min(self.store.num_rows("validation"), 256)
    tokens, segments = self.store.read_rows("validation", np.arange(rows))[:2]
    real = tokens[segments > 0]
    text = self.tokenizer.decode(real.tolist())
    return len(text.encode("utf-8")) / max(real.size, 1)

  def train_batches(
    self,
    *,
    global_batch_size: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> Iterator[dict[str, np.ndarray]]:
    """This process's numpy batches [global_batch_size / process_count, seq_len] of steps
    start_step, start_step + 1, ... (endless; epochs roll over by themselves)."""
    p, n = _process(process_index, process_count)
    return sampler.train_iterator(self.store, self.seed, global_batch_size, start_step, p, n)

  def eval_batches(
    self,
    *,
    global_batch_size: int,
    num_batches: int,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> list[dict[str, np.ndarray]]:
    """The same validation batches on every call (no shuffle), this process's share of each."""
    p, n = _process(process_index, process_count)
    return sampler.eval_batches(self.store, global_batch_size, num_batches, p, n)

  def consumption(self, step: int) -> tuple[dict[str, float], dict | None]:
    """Log values and a report entry on what this process consumed from each source of a
    mixture (``Mixture.consumption``); nothing for a single source."""
    return {}, None


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to this JAX process's place in the cluster."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  return index, count


def _keep_tensorflow_off_accelerators() -> None:
  # TensorFlow only reads files and shuffles indices here; on a GPU/TPU host it would otherwise
  # reserve accelerator memory that JAX needs.
  for kind in ("GPU", "TPU"):
    # RuntimeError: TensorFlow already initialised; ValueError: no such device type.
    with contextlib.suppress(RuntimeError, ValueError):
      tf.config.set_visible_devices([], kind)


def build_local(config: ml_collections.ConfigDict, *, shares: int = 1, resolved=None) -> Pipeline:
  """Resolves data.source, builds the tokenizer and prepares (or reuses) the packed store.

  ``shares > 1`` (``data.parallel_prepare``): the documents were tokenized by that many processes
  into the shared cache (``input_pipeline/shares.py``); the store is packed from their shares.
  ``resolved``: the (source, tokenizer) that ``source_and_tokenizer(config)`` already returned.
  """
  data = config.data
  cache_dir = storage.cache_path(data.cache_dir)
  if resolved is None:
    _check(data)
    if tuple(data.get("mixture", ())):
      return _build_mixture(config, cache_dir)
    if data.source.startswith(("chat:", preference.PREFIX)):
      return _build_chat(config, cache_dir)
    resolved = source_and_tokenizer(config)
  source, tokenizer = resolved
  tokenized = None
  if shares > 1:
    fp = store.fingerprint(source.identity, tokenizer.identity, int(data.seq_len))
    if not store.exists(source, tokenizer, int(data.seq_len), cache_dir):
      tokenized = shares_lib.reader(cache_dir, fp, shares)
    prepared = _prepare(source, tokenizer, data, cache_dir, tokenized=tokenized)
    shares_lib.remove(cache_dir, fp)
  else:
    prepared = _prepare(source, tokenizer, data, cache_dir)
  return _ready(config, tokenizer, prepared)


def _check(data) -> None:
  _keep_tensorflow_off_accelerators()
  tfds.disable_progress_bar()  # the log says what is being prepared; bars garble CI logs
  if data.tokenizer not in tokenizers.TOKENIZERS[:2] and not data.tokenizer.startswith("hf:"):
    raise errors.DataError(
      f"unknown data.tokenizer={data.tokenizer!r}; valid: {', '.join(tokenizers.TOKENIZERS)}"
    )
  if int(data.seq_len) < 1:
    raise errors.DataError(f"data.seq_len must be >= 1, got {data.seq_len}")


def source_and_tokenizer(
  config: ml_collections.ConfigDict,
) -> tuple[sources.Source, tokenizers.Tokenizer]:
  """data.source's Source (a local corpus becomes a TFDS dataset on the way) and the tokenizer
  (a SentencePiece model is trained and cached when none is given). One text source only."""
  data = config.data
  _check(data)
  cache_dir = storage.cache_path(data.cache_dir)
  source = sources.from_spec(data.source, data, cache_dir)
  tokenizer = tokenizers.build_tokenizer(
    data.tokenizer,
    spm_model=data.spm_model,
    spm_vocab_size=int(data.spm_vocab_size),
    source_identity=source.identity,
    train_documents=lambda: source.documents("train"),
    cache_dir=cache_dir,
  )
  return source, tokenizer


def tokenize_share(config: ml_collections.ConfigDict, resolved, process: int, count: int) -> dict:
  """data.parallel_prepare: this process's share of the documents, tokenized into the shared
  cache (unless the store is already there); documents per split."""
  source, tokenizer = resolved
  data = config.data
  cache_dir = storage.cache_path(data.cache_dir)
  if store.exists(source, tokenizer, int(data.seq_len), cache_dir):
    return {}
  return shares_lib.write(source, tokenizer, int(data.seq_len), cache_dir, process, count)


def _prepare(source, tokenizer, data, cache_dir: Path, renderer=None, tokenized=None):
  """The packed store of one source with the data config's length, checks and shard size."""
  return store.prepare(
    source,
    tokenizer,
    int(data.seq_len),
    cache_dir,
    renderer=renderer,
    verify=bool(data.verify_store),
    shard_mb=float(data.store_shard_mb),
    tokenized=tokenized,
  )


class MixturePipeline(Pipeline):
  """Several prepared stores read as one weighted mixture (input_pipeline/mixture.py)."""

  def __init__(self, tokenizer, mix: mixture.Mixture, seed: int):
    super().__init__(tokenizer, mix.stores[0], seed)
    self.mixture = mix

  @property
  def fingerprint(self) -> str:
    return self.mixture.fingerprint

  @functools.cached_property
  def bytes_per_token(self) -> float:
    weights = self.mixture.table[-1][1]
    stores = self.mixture.stores
    per_store = [Pipeline(self.tokenizer, s, self.seed).bytes_per_token for s in stores]
    return float(np.dot(weights, per_store))

  def train_batches(
    self, *, global_batch_size, start_step=0, process_index=None, process_count=None
  ):
    p, n = _process(process_index, process_count)
    return self.mixture.train_batches(global_batch_size, start_step, p, n)

  def eval_batches(self, *, global_batch_size, num_batches, process_index=None, process_count=None):
    p, n = _process(process_index, process_count)
    return self.mixture.eval_batches(global_batch_size, num_batches, p, n)

  def consumption(self, step: int) -> tuple[dict[str, float], dict | None]:
    return self.mixture.consumption(step)


def _build_mixture(config: ml_collections.ConfigDict, cache_dir: Path) -> Pipeline:
  data = config.data
  specs, _, table = mixture_spec.parse(tuple(data.mixture), tuple(data.get("mixture_stages", ())))
  if any(spec.startswith(("chat:", preference.PREFIX)) for spec in specs):
    raise errors.DataError(
      f"data.mixture {specs}: chat and prefs sources cannot be mixed (yet); use one"
    )
  resolved = [sources.from_spec(spec, data, cache_dir) for spec in specs]
  tokenizer = tokenizers.build_tokenizer(
    data.tokenizer,
    spm_model=data.spm_model,
    spm_vocab_size=int(data.spm_vocab_size),
    # The sample follows the first stage's weights, which are left out of the recipe: a
    # mixture reweighted on resume (checkpoint.allow_mismatch) keeps its cached tokenizer.
    source_identity={"mixture": [source.identity for source in resolved]},
    train_documents=lambda: mixture.tokenizer_documents(resolved, table[0][1]),
    cache_dir=cache_dir,
  )
  stores = [_prepare(source, tokenizer, data, cache_dir) for source in resolved]
  mix = mixture.Mixture(stores, specs, table, int(config.seed))
  for spec, prepared, weight in zip(specs, stores, table[0][1], strict=True):
    _log.info(
      "Mixture source %s: weight %.4f, store %s (train %d rows, validation %d rows)",
      spec,
      weight,
      prepared.path,
      prepared.num_rows("train"),
      prepared.num_rows("validation"),
    )
  return MixturePipeline(tokenizer, mix, int(config.seed))


def _build_chat(config: ml_collections.ConfigDict, cache_dir: Path) -> Pipeline:
  """chat:PATH: conversations rendered with the tokenizer's chat template, loss on assistant
  turns only (input_pipeline/chat.py). prefs:PATH: preference pairs, rendered the same way,
  packed whole into rows, loss on the completions only (input_pipeline/preference.py)."""
  data = config.data
  kind = data.source.partition(":")[0]
  if data.tokenizer == "sentencepiece" and not data.spm_model:
    raise errors.DataError(
      f"data.source='{kind}:...' needs a ready tokenizer: use data.tokenizer='hf:DIR' (its chat "
      f"template), 'byte', or data.spm_model; a SentencePiece model is not trained on {kind} data"
    )
  tokenizer = tokenizers.load_tokenizer(data)
  template = getattr(tokenizer, "chat_template", None)
  if kind == "chat":
    source = chat.read(data.source, int(data.validation_percent))
    renderer = chat.Renderer(template, getattr(tokenizer, "special_tokens", None))
  else:
    source = preference.read(data.source, int(data.validation_percent))
    renderer = preference.PairRenderer(template, tokenizer)
  template_hash = hashlib.sha256((template or chat.FALLBACK_TEMPLATE).encode()).hexdigest()
  source = dataclasses.replace(source, identity={**source.identity, "template": template_hash})
  prepared = _prepare(source, tokenizer, data, cache_dir, renderer=renderer)
  for split, stats in prepared.manifest["splits"].items():
    if stats.get("pairs_too_long"):
      _log.warning(
        "%s: %d %s pairs longer than data.seq_len + 1 = %d tokens skipped",
        data.source,
        stats["pairs_too_long"],
        split,
        int(data.seq_len) + 1,
      )
  return _ready(config, tokenizer, prepared)


def _ready(config, tokenizer, prepared: store.Store) -> Pipeline:
  data = config.data
  _log.info(
    "Input pipeline: %s, tokenizer %s, store %s (train %d rows, validation %d rows, packing %.4f)",
    data.source,
    tokenizer.identity,
    prepared.path,
    prepared.num_rows("train"),
    prepared.num_rows("validation"),
    prepared.manifest["packing_efficiency"],
  )
  return Pipeline(tokenizer, prepared, int(config.seed))
