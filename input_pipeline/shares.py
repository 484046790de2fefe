"""One store prepared by every process: each tokenizes its share of the documents, one packs.

``data.parallel_prepare=True`` (with several processes) splits each split's documents, in the
source's stored order, into one contiguous range per process (``Source.documents(split, share)``).
Each process tokenizes its range and writes the ids to ``<cache>/stores/.shares.<fingerprint>/``
(in chunks of about ``CHUNK_TOKENS`` ids: ``<split>.<p>-of-<n>.<k>.npz`` with the documents'
lengths and their ids, then ``<split>.<p>-of-<n>.done.json`` naming the chunk count). Process 0
then packs the shares in process order through the very code a single process uses
(``store.prepare(..., tokenized=...)``), so the store is byte for byte the single-process one, and
removes the shares. Tokenizing is the part that scales with the corpus and the tokenizer's cost;
packing is a sequential stream (a document may straddle rows), ~37 s per GB of tokens here.

The cache must be shared by every process (an object store such as ``gs://``, or one file
system): process 0 reads every share from there and says so when one is missing.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator

import numpy as np

from input_pipeline import errors, store
from input_pipeline.host import storage

_log = logging.getLogger(__name__)

CHUNK_TOKENS = 1 << 25  # ids per chunk file (~64 MB of uint16): memory stays flat per process


def directory(cache_dir, fp: str):
  return storage.absolute(cache_dir) / "stores" / f".shares.{fp}"


def _name(split: str, process: int, count: int) -> str:
  return f"{split}.{process}-of-{count}"


def write(
  source, tokenizer, seq_len: int, cache_dir, process: int, count: int, splits=store.SPLITS
) -> dict[str, int]:
  """Tokenizes this process's share of every split into the shared cache; documents per split."""
  fp = store.fingerprint(source.identity, tokenizer.identity, seq_len)
  folder = directory(cache_dir, fp)
  folder.mkdir(parents=True, exist_ok=True)
  dtype = np.dtype(np.uint16) if tokenizer.vocab_size <= (1 << 16) else np.dtype(np.int32)
  counts = {}
  for split in splits:
    name = _name(split, process, count)
    docs = store.encode(source.documents(split, share=(process, count)), tokenizer)
    chunks, documents = 0, 0
    lengths: list[int] = []
    pieces: list[np.ndarray] = []
    pending = 0
    for ids in docs:
      lengths.append(len(ids))
      pieces.append(np.asarray(ids, dtype))
      pending += len(ids)
      documents += 1
      if pending >= CHUNK_TOKENS:
        _write_chunk(folder / f"{name}.{chunks}.npz", lengths, pieces, dtype)
        chunks, lengths, pieces, pending = chunks + 1, [], [], 0
    if lengths:
      _write_chunk(folder / f"{name}.{chunks}.npz", lengths, pieces, dtype)
      chunks += 1
    done = {"chunks": chunks, "documents": documents}
    storage.write_atomic(folder / f"{name}.done.json", json.dumps(done))
    counts[split] = documents
  return counts


def _write_chunk(path, lengths: list[int], pieces: list[np.ndarray], dtype: np.dtype) -> None:
  buffer = io.BytesIO()
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
  np.savez(buffer, lengths=np.asarray(lengths, np.int64), tokens=tokens)
  storage.write_atomic(path, buffer.getvalue())


def reader(cache_dir, fp: str, count: int) -> Callable[[str], Iterator[np.ndarray]]:
  """``tokenized`` for ``store.prepare``: a split's documents' ids, every share in process order.

  Checks first that every process's share of every split is complete.
  """
  folder = directory(cache_dir, fp)

  def done(split: str, process: int) -> dict:
    path = folder / f"{_name(split, process, count)}.done.json"
    try:
      return json.loads(path.read_text())
    except FileNotFoundError:
      raise errors.DataError(
        f"data.parallel_prepare: process {process}'s share of the {split} split is not in "
        f"{folder} (no {path.name}); every process must see the same data.cache_dir (an object "
        "store such as gs://..., or one shared file system), or set data.parallel_prepare=False"
      ) from None

  def tokenized(split: str) -> Iterator[np.ndarray]:
    marks = [done(split, p) for p in range(count)]
    for process, mark in enumerate(marks):
      for k in range(int(mark["chunks"])):
        path = folder / f"{_name(split, process, count)}.{k}.npz"
        with np.load(io.BytesIO(path.read_bytes())) as chunk:
          lengths, tokens = chunk["lengths"], chunk["tokens"]
        if len(lengths):
          yield from np.split(tokens, np.cumsum(lengths)[:-1])

  return tokenized


def remove(cache_dir, fp: str) -> None:
  """Deletes the shares once the store is packed."""
  folder = directory(cache_dir, fp)
  if folder.exists():
    folder.rmtree()


def check_supported(data) -> None:
  """data.parallel_prepare covers one text source; say so for the others."""
  if tuple(data.get("mixture", ())) or str(data.source).startswith(("chat:", "prefs:")):
    raise errors.DataError(
      f"data.parallel_prepare=True prepares one text source (data.source stdlib, files:... or "
      f"tfds:...), not {'data.mixture' if tuple(data.get('mixture', ())) else repr(data.source)}; "
      "set data.parallel_prepare=False (process 0 then prepares while the others wait)"
    )
