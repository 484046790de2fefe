"""The prepared store: packed rows on disk, written once, named by a fingerprint of all inputs.

Layout: <data.cache_dir>/stores/<fingerprint>/
  manifest.json                     source, tokenizer identity, seq_len, rows and packing efficiency
                                    per split, format version, fingerprint, the shard index (rows
                                    per shard, per split) and size and sha256 of every file
  {split}_tokens.<i>.npy            shard i: [rows_i, seq_len + 1] token ids (uint16; int32 past
                                    65535), for split train and validation
  {split}_segment_ids.<i>.npy       [rows_i, seq_len + 1] 1, 2, ... per document piece, 0 = padding
  {split}_positions.<i>.npy         [rows_i, seq_len + 1] position within the piece

Shards hold ~``data.store_shard_mb`` of tokens each (the same rows for every array of a split), so
a store far larger than one host is many ordinary objects. A row is read where it lies: on local
disks through a memory map (zero copy, pages come and go as the OS likes), on object stores by a
byte-range request per row, all of a batch's requests in flight at once (fsspec's cat_ranges), so
a host fetches only its own rows and never copies the store (tested: each of two processes reads
no more than its share from the GCS emulator).

Why .npy shards rather than ArrayRecord: a row of a .npy file is at a computable byte offset, so
random access needs no index read and no dependency beyond numpy; local memory maps and remote
range reads share one layout; and the header states dtype and shape, a sha256 covers the bytes.
ArrayRecord's reader (TFDS's array_record format, Grain's sources) opens local files only here (its
C++ file layer has no GCS client that an emulator can serve), so it would bring back the
whole-store copy this layout removes. Rows are appended as they are packed; each shard's .npy
header (whose shape is only known at the end) is written last.

Atomicity: a store is built in a hidden temporary directory and renamed into place only when every
array and the manifest are written, so a crash never leaves a store that looks complete. When
several processes prepare the same store at once, the first rename wins and the others discard
their temporary directory. An existing store that fails verification is refused, never replaced.
"""

import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from input_pipeline import errors, packing, shards
from input_pipeline.errors import StoreError
from input_pipeline.host import storage
from input_pipeline.shards import shard_name

_log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: arrays in shards with an index (1: one file per array)
PACKING_SCHEME = "stream-overlap1"  # see packing.py
ARRAYS = ("tokens", "segment_ids", "positions")
SPLITS = ("train", "validation")
MASK = "loss_mask"  # chat and preference stores only: which tokens may be targets (completions)
_NpyWriter = shards.NpyWriter  # the writer of every shard (tests patch it)
_ENCODE_CHUNK = 256  # documents tokenized per call (SentencePiece batches them over threads)
DEFAULT_SHARD_MB = 256  # tokens per shard file, roughly


def fingerprint(source_identity: dict, tokenizer_identity: dict, seq_len: int) -> str:
  """sha256 (hex) of everything that determines the store's contents."""
  inputs = _fingerprint_inputs(source_identity, tokenizer_identity, seq_len)
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _fingerprint_inputs(source_identity: dict, tokenizer_identity: dict, seq_len: int) -> dict:
  return {
    "format_version": FORMAT_VERSION,
    "packing": PACKING_SCHEME,
    "source": source_identity,
    "tokenizer": tokenizer_identity,
    "seq_len": seq_len,
  }


class Store:
  """A verified store: sharded arrays per split and the manifest."""

  def __init__(self, path: Path, manifest: dict, arrays: dict[str, dict[str, shards.ShardedArray]]):
    self.path = path
    self.manifest = manifest
    self.fingerprint: str = manifest["fingerprint"]
    self._arrays = arrays

  @property
  def remote(self) -> bool:
    """On an object store: rows are fetched by range requests (input_pipeline/sampler.py reads
    them on the calling thread, never inside tf.data's threads)."""
    return storage.is_remote(self.path)

  @property
  def bytes_read(self) -> int:
    """Bytes of rows this process has read from the store (its share, nothing more)."""
    return sum(a.bytes_read for split in self._arrays.values() for a in split.values())

  def num_rows(self, split: str) -> int:
    return int(self.manifest["splits"][split]["rows"])

  @property
  def array_names(self) -> tuple[str, ...]:
    return tuple(self.manifest.get("array_names", ARRAYS))

  def read_rows(self, split: str, rows_B: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows (any order) of one split: ([B, seq_len + 1] tokens, segment_ids, positions, and for
    chat stores loss_mask)."""
    arrays = self._arrays[split]
    return tuple(arrays[name][rows_B] for name in self.array_names)


def prepare(
  source,
  tokenizer,
  seq_len: int,
  cache_dir: Path,
  splits: Iterable[str] = SPLITS,
  renderer=None,
  verify: bool = False,
  shard_mb: float = DEFAULT_SHARD_MB,
  tokenized=None,
) -> Store:
  """Returns the store for these inputs, packing it first unless a verified one already exists.

  ``renderer`` (chat sources, ``input_pipeline/chat.py``) turns each conversation into pieces
  whose tokens carry a loss mask; the store then has a fourth array, ``loss_mask``. A preference
  source's renderer (``input_pipeline/preference.py``) makes each record a pair of masked
  documents, packed whole into rows (``packing.PairPacker``).
  ``tokenized(split)``: the split's documents already tokenized (an iterable of id arrays in the
  source's order, e.g. every process's share read back: ``input_pipeline/shares.py``) instead of
  tokenizing ``source.documents(split)`` here; the store is the same byte for byte.
  """
  if seq_len < 1:
    raise errors.DataError(f"data.seq_len must be >= 1, got {seq_len}")
  fp = fingerprint(source.identity, tokenizer.identity, seq_len)
  remote = storage.is_remote(cache_dir)
  stores = storage.absolute(cache_dir) / "stores"
  final = stores / fp
  if (final / "manifest.json").exists() if remote else final.exists():
    return load(final, fp, verify=verify)
  # Built on local disk first: in the cache's own stores/ directory (renamed into place), or for
  # an object store in local scratch space (uploaded, manifest last).
  work = storage.local_scratch(cache_dir) / "stores" if remote else Path(stores)
  work.mkdir(parents=True, exist_ok=True)
  _remove_dead_temporaries(work)
  tmp = work / f".tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}.{socket.gethostname()}"
  tmp.mkdir()
  try:
    start = time.time()
    manifest = {
      "format_version": FORMAT_VERSION,
      "fingerprint": fp,
      "inputs": _fingerprint_inputs(source.identity, tokenizer.identity, seq_len),
      "source": source.spec,
      "tokenizer": tokenizer.identity,
      "seq_len": seq_len,
      "row_width": seq_len + 1,
      "array_names": list(ARRAYS) + ([MASK] if renderer else []),
      "splits": {},
      "arrays": {},
      "shards": {},
    }
    for split in splits:
      if renderer is not None:
        items = source.documents(split)
      elif tokenized is not None:
        items = tokenized(split)
      else:
        items = encode(source.documents(split), tokenizer)
      stats, arrays, shards = _write_split(
        tmp, split, items, tokenizer, seq_len, renderer, shard_mb
      )
      manifest["splits"][split] = stats
      manifest["arrays"].update(arrays)
      manifest["shards"][split] = shards
    train = manifest["splits"]["train"]
    if train["rows"] == 0 and train.get("pairs_too_long"):
      raise errors.DataError(
        f"data.source={source.spec!r}: none of the {train['pairs_too_long']} train pairs fits "
        f"a row of data.seq_len + 1 = {seq_len + 1} tokens (prompt + chosen + prompt + "
        "rejected); raise data.seq_len or shorten the records"
      )
    if train["rows"] == 0:
      raise errors.DataError(
        f"data.source={source.spec!r}: the train split holds no text (empty corpus)"
      )
    manifest["packing_efficiency"] = manifest["splits"]["train"]["packing_efficiency"]
    manifest["prepare_seconds"] = round(time.time() - start, 3)
    _write_json(tmp / "manifest.json", manifest)
    if remote:
      _upload(tmp, final)
      _log.info("Prepared store %s in %.1f s: %s", final, time.time() - start, _summary(manifest))
    else:
      try:
        os.rename(tmp, final)
        _log.info("Prepared store %s in %.1f s: %s", final, time.time() - start, _summary(manifest))
      except OSError:
        if not final.exists():
          raise
        _log.info("Another process prepared %s first; discarding this copy", final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return load(final, fp)


def _upload(local: Path, remote) -> None:
  """Copies a finished store to an object store, the manifest last: a store whose manifest is
  there is complete (each object write is atomic; two processes upload identical bytes)."""
  remote.mkdir(parents=True, exist_ok=True)
  for file in sorted(local.iterdir(), key=lambda f: f.name == "manifest.json"):
    with open(file, "rb") as src, (remote / file.name).open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)


def load(path, expected_fingerprint: str | None = None, *, verify: bool = False) -> Store:
  """Opens a store and checks it against its manifest: format, fingerprint, every array's dtype,
  shape and byte size. ``verify`` also re-hashes every array (sha256): the full check of
  ``python -m input_pipeline.prepare --verify``, too slow to repeat on every host at every start.

  A store on an object store stays there: each shard's size is checked against the manifest
  (one metadata request per file) and rows are read by byte ranges when asked for.
  """
  path = storage.absolute(path)
  hint = "delete that directory to prepare it again"
  try:
    manifest = json.loads((path / "manifest.json").read_text())
  except (OSError, ValueError) as e:
    raise StoreError(f"store {path} has no readable manifest.json ({e}); {hint}") from e
  if manifest.get("format_version") != FORMAT_VERSION:
    raise StoreError(
      f"store {path} has format_version {manifest.get('format_version')!r}, this code reads "
      f"{FORMAT_VERSION}; {hint}"
    )
  want = expected_fingerprint or path.name
  if manifest.get("fingerprint") != want:
    raise StoreError(
      f"store {path} holds fingerprint {manifest.get('fingerprint')!r}, expected {want!r}; {hint}"
    )
  remote = storage.is_remote(path)
  arrays: dict[str, dict[str, shards.ShardedArray]] = {}
  for split, stats in manifest["splits"].items():
    rows = manifest["shards"][split]
    if sum(rows) != stats["rows"]:
      raise StoreError(f"store {path}: the {split} shard index does not add up; {hint}")
    arrays[split] = {}
    for name in manifest.get("array_names", ARRAYS):
      base = path if remote else Path(path)
      files = [base / shard_name(split, name, i) for i in range(len(rows))]
      metas = [manifest["arrays"].get(f.name) for f in files]
      if any(meta is None for meta in metas):
        raise StoreError(f"store {path}: the manifest lacks shards of {split}_{name}; {hint}")
      maps = None
      if remote:
        for file, meta in zip(files, metas, strict=True):
          shards.check_remote(file, meta, hint, verify)
      else:
        maps = [
          shards.open_local(f, meta, r, manifest["row_width"], hint, verify)
          for f, meta, r in zip(files, metas, rows, strict=True)
        ]
      dtype = np.dtype(metas[0]["dtype"]) if metas else np.dtype(np.int32)
      arrays[split][name] = shards.ShardedArray(files, rows, dtype, manifest["row_width"], maps)
  return Store(path if remote else Path(path), manifest, arrays)


def exists(source, tokenizer, seq_len: int, cache_dir) -> bool:
  """Whether the store for these inputs is already prepared in ``cache_dir``."""
  fp = fingerprint(source.identity, tokenizer.identity, seq_len)
  final = storage.absolute(cache_dir) / "stores" / fp
  return (final / "manifest.json").exists() if storage.is_remote(cache_dir) else final.exists()


def encode(documents: Iterable[str], tokenizer) -> Iterable[np.ndarray]:
  """Each document's token ids (without eod), in order; encoded a chunk of documents at a time."""
  chunk: list[str] = []
  for doc in documents:
    chunk.append(doc)
    if len(chunk) == _ENCODE_CHUNK:
      yield from tokenizer.encode_array(chunk)
      chunk = []
  yield from tokenizer.encode_array(chunk)


def _write_split(
  tmp: Path,
  split: str,
  items,
  tokenizer,
  seq_len: int,
  renderer=None,
  shard_mb: float = DEFAULT_SHARD_MB,
):
  token_dtype = packing.row_dtype(tokenizer.vocab_size - 1)
  index_dtype = packing.row_dtype(seq_len + 1)
  pairs = hasattr(renderer, "pair")  # preference records (input_pipeline/preference.py)
  if pairs:
    packer = packing.PairPacker(seq_len, tokenizer.pad_id, token_dtype)
  else:
    packer = packing.Packer(
      seq_len, tokenizer.eod_id, tokenizer.pad_id, token_dtype, with_mask=renderer is not None
    )
  names = ARRAYS + ((MASK,) if renderer else ())
  dtypes = dict(zip(names, (token_dtype, index_dtype, index_dtype, np.uint8), strict=False))
  # The same rows per shard for every array: sized by the token array's bytes.
  shard_rows = max(1, int(shard_mb * (1 << 20)) // ((seq_len + 1) * np.dtype(token_dtype).itemsize))
  writers: dict[str, list[shards.NpyWriter]] = {name: [] for name in names}
  filled = [shard_rows]  # rows in the newest shard (full: open one at the next row)

  def write(blocks):
    for block in blocks:
      start = 0
      while start < len(block[0]):
        if filled[0] == shard_rows:
          for name in names:
            index = len(writers[name])
            writers[name].append(
              shards.NpyWriter(tmp / shard_name(split, name, index), dtypes[name], seq_len + 1)
            )
          filled[0] = 0
        take = min(shard_rows - filled[0], len(block[0]) - start)
        for name, rows in zip(names, block, strict=True):
          writers[name][-1].append(rows[start : start + take])
        filled[0] += take
        start += take

  # items: preference records, conversations (with a renderer) or each document's token ids.
  for item in items:
    if pairs:
      write(packer.add(*renderer.pair(item)))
    elif renderer is not None:
      write(packer.add(*_masked_tokens(renderer.pieces(item), tokenizer)))
    else:
      write(packer.add(item))
  write(packer.finish())
  arrays = {}
  for files in writers.values():
    for writer in files:
      writer.close()
      arrays[writer.path.name] = {
        "dtype": str(writer.dtype),
        "shape": [writer.rows, seq_len + 1],
        "sha256": shards.sha256(writer.path),
      }
  shard_rows_list = [writer.rows for writer in writers["tokens"]]
  stats = {
    "rows": sum(shard_rows_list),
    "documents": packer.num_documents,
    "real_tokens": packer.real_slots,
    "packing_efficiency": round(packer.efficiency, 6),
  }
  if pairs:  # preference pairs longer than a row are skipped (input_pipeline/packing.py)
    stats["pairs_too_long"] = packer.too_long
  return stats, arrays, shard_rows_list


def _masked_tokens(pieces: list[tuple[str, bool]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """A conversation's token ids and its loss mask (one more flag: the eod after the last piece,
  trained when the conversation ends with an assistant turn that the template did not end with
  the eod token itself, input_pipeline/chat.py)."""
  ids: list[int] = []
  mask: list[int] = []
  for text, trainable in pieces:
    piece = tokenizer.encode(text)
    ids += piece
    mask += [int(trainable)] * len(piece)
  ended = bool(pieces) and tokenizer.eod_id in piece  # the template wrote the eod token itself
  mask.append(int(pieces[-1][1] and not ended) if pieces else 0)
  return np.asarray(ids, np.int64), np.asarray(mask, np.uint8)


def _write_json(path: Path, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())


def _summary(manifest: dict) -> str:
  parts = [
    f"{split} {s['rows']} rows ({s['documents']} docs, efficiency {s['packing_efficiency']:.4f})"
    for split, s in manifest["splits"].items()
  ]
  return "; ".join(parts)


def _remove_dead_temporaries(stores: Path) -> None:
  """Removes temporaries left by crashed preparations of this host (their process is gone)."""
  host = socket.gethostname()
  for tmp in stores.glob(".tmp.*"):
    parts = tmp.name.split(".", 4)  # "", "tmp", pid, random, host
    if len(parts) != 5 or parts[4] != host or not parts[2].isdigit():
      continue
    pid = parts[2]
    if int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      _log.info("Removing %s, left by a preparation that did not finish", tmp)
      shutil.rmtree(tmp, ignore_errors=True)
    except PermissionError:
      pass  # alive, owned by someone else
