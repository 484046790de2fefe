"""The prepared store: packed rows on disk, written once, named by a fingerprint of all inputs.

Layout: <data.cache_dir>/stores/<fingerprint>/
  manifest.json                     source, tokenizer identity, seq_len, rows and packing efficiency
                                    per split, format version, fingerprint, sha256 of every array
  {train,validation}_tokens.npy     [rows, seq_len + 1] token ids (uint16, int32 past 65535)
  {train,validation}_segment_ids.npy  [rows, seq_len + 1] 1, 2, ... per document piece, 0 = padding
  {train,validation}_positions.npy  [rows, seq_len + 1] position within the piece

Why plain .npy files rather than ArrayRecord or TFRecord: a memory-mapped .npy gives zero-copy
random access to any row (the sampler reads rows in permuted order), handles corpora larger than
host memory (pages come and go as the OS likes), needs no dependency beyond numpy, and is trivial to
verify: the header states dtype and shape, and a sha256 covers the bytes. Rows are appended as
they are packed, with the .npy header (whose shape is only known at the end) written last.

Atomicity: a store is built in a hidden temporary directory and renamed into place only when every
array and the manifest are written, so a crash never leaves a store that looks complete. When
several processes prepare the same store at once, the first rename wins and the others discard
their temporary directory. An existing store that fails verification is refused, never replaced.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from input_pipeline import errors, packing
from train import storage

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PACKING_SCHEME = "stream-overlap1"  # see packing.py
ARRAYS = ("tokens", "segment_ids", "positions")
MASK = "loss_mask"  # chat stores only: which tokens may be targets (assistant turns)
_HEADER_BYTES = 128  # room reserved for the .npy header, which is written once the shape is known
_ENCODE_CHUNK = 256  # documents tokenized per call (SentencePiece batches them over threads)


class StoreError(errors.DataError):
  """A store on disk is incomplete, corrupt or not the one asked for."""


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
  """A verified store: memory-mapped arrays per split and the manifest."""

  def __init__(self, path: Path, manifest: dict, arrays: dict[str, dict[str, np.ndarray]]):
    self.path = path
    self.manifest = manifest
    self.fingerprint: str = manifest["fingerprint"]
    self._arrays = arrays

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
  splits: Iterable[str] = ("train", "validation"),
  renderer=None,
  verify: bool = False,
) -> Store:
  """Returns the store for these inputs, packing it first unless a verified one already exists.

  ``renderer`` (chat sources, ``input_pipeline/chat.py``) turns each conversation into pieces
  whose tokens carry a loss mask; the store then has a fourth array, ``loss_mask``.
  """
  if seq_len < 1:
    raise errors.DataError(f"data.seq_len must be >= 1, got {seq_len}")
  fp = fingerprint(source.identity, tokenizer.identity, seq_len)
  remote = storage.is_remote(cache_dir)
  stores = storage.resolve(cache_dir) / "stores"
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
    }
    for split in splits:
      documents = source.documents(split)
      stats, arrays = _write_split(tmp, split, documents, tokenizer, seq_len, renderer)
      manifest["splits"][split] = stats
      manifest["arrays"].update(arrays)
    if manifest["splits"]["train"]["rows"] == 0:
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

  A store on an object store is copied once into this host's local scratch space (checked the
  same way) and memory-mapped from there.
  """
  path = storage.resolve(path)
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
  local = _local_copy(path, manifest, hint) if storage.is_remote(path) else Path(path)
  arrays: dict[str, dict[str, np.ndarray]] = {}
  for split, stats in manifest["splits"].items():
    arrays[split] = {}
    for name in manifest.get("array_names", ARRAYS):
      file = local / f"{split}_{name}.npy"
      arrays[split][name] = _open_array(file, manifest, stats["rows"], hint, verify)
  return Store(path if storage.is_remote(path) else local, manifest, arrays)


def _local_copy(remote, manifest: dict, hint: str) -> Path:
  """This host's copy of a remote store (made once; each file checked by size on arrival)."""
  local = Path(storage.local_scratch(remote.parent.parent)) / "stores" / manifest["fingerprint"]
  done = local / "manifest.json"
  if done.exists() and json.loads(done.read_text()) == manifest:
    return local
  local.mkdir(parents=True, exist_ok=True)
  start = time.time()
  for filename, meta in manifest["arrays"].items():
    tmp = local / f".{filename}.{os.getpid()}.tmp"
    with (remote / filename).open("rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)
    expected = _HEADER_BYTES + math.prod(meta["shape"]) * np.dtype(meta["dtype"]).itemsize
    if tmp.stat().st_size != expected:
      raise StoreError(
        f"store array {remote / filename} holds {tmp.stat().st_size} bytes, the manifest says "
        f"{expected}; {hint}"
      )
    os.replace(tmp, local / filename)
  _write_json(done, manifest)
  _log.info("Copied store %s to %s in %.1f s", remote, local, time.time() - start)
  return local


def _open_array(file: Path, manifest: dict, rows: int, hint: str, verify: bool) -> np.ndarray:
  meta = manifest["arrays"].get(file.name)
  want_shape = (rows, manifest["row_width"])
  try:
    array = np.load(file, mmap_mode="r", allow_pickle=False)  # data only, never code
  except (OSError, ValueError) as e:
    raise StoreError(f"store array {file} cannot be read ({e}); {hint}") from e
  if meta is None or tuple(array.shape) != want_shape or str(array.dtype) != meta["dtype"]:
    raise StoreError(
      f"store array {file} is {array.dtype}{list(array.shape)}, the manifest says "
      f"{meta and meta['dtype']}{list(want_shape)}; {hint}"
    )
  size, expected = file.stat().st_size, _HEADER_BYTES + array.nbytes
  if size != expected:
    raise StoreError(f"store array {file} holds {size} bytes, expected {expected}; {hint}")
  if verify and _sha256(file) != meta["sha256"]:
    raise StoreError(f"store array {file} fails its sha256 check (corrupt); {hint}")
  return array


def _write_split(tmp: Path, split: str, documents, tokenizer, seq_len: int, renderer=None):
  token_dtype = packing.row_dtype(tokenizer.vocab_size - 1)
  index_dtype = packing.row_dtype(seq_len + 1)
  packer = packing.Packer(
    seq_len, tokenizer.eod_id, tokenizer.pad_id, token_dtype, with_mask=renderer is not None
  )
  names = ARRAYS + ((MASK,) if renderer else ())
  dtypes = dict(zip(names, (token_dtype, index_dtype, index_dtype, np.uint8), strict=False))
  writers = {
    name: _NpyWriter(tmp / f"{split}_{name}.npy", dtypes[name], seq_len + 1) for name in names
  }

  def write(blocks):
    for block in blocks:
      for name, rows in zip(names, block, strict=True):
        writers[name].append(rows)

  if renderer is not None:
    for conversation in documents:
      write(packer.add(*_masked_tokens(renderer.pieces(conversation), tokenizer)))
  else:
    chunk: list[str] = []
    for doc in documents:
      chunk.append(doc)
      if len(chunk) == _ENCODE_CHUNK:
        for ids in tokenizer.encode_array(chunk):
          write(packer.add(ids))
        chunk = []
    for ids in tokenizer.encode_array(chunk):
      write(packer.add(ids))
  write(packer.finish())
  arrays = {}
  for writer in writers.values():
    writer.close()
    arrays[writer.path.name] = {
      "dtype": str(writer.dtype),
      "shape": [writer.rows, seq_len + 1],
      "sha256": _sha256(writer.path),
    }
  stats = {
    "rows": writers["tokens"].rows,
    "documents": packer.num_documents,
    "real_tokens": packer.real_slots,
    "packing_efficiency": round(packer.efficiency, 6),
  }
  return stats, arrays


def _masked_tokens(pieces: list[tuple[str, bool]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """A conversation's token ids and its loss mask (one more flag: the eod after the last piece,
  trained when the conversation ends with an assistant turn)."""
  ids: list[int] = []
  mask: list[int] = []
  for text, trainable in pieces:
    piece = tokenizer.encode(text)
    ids += piece
    mask += [int(trainable)] * len(piece)
  mask.append(int(pieces[-1][1]) if pieces else 0)
  return np.asarray(ids, np.int64), np.asarray(mask, np.uint8)


class _NpyWriter:
  """Appends rows to a .npy file; the header (with the final row count) is written on close."""

  def __init__(self, path: Path, dtype: np.dtype, width: int):
    self.path, self.dtype, self.width, self.rows = path, np.dtype(dtype), width, 0
    self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
    self._file.write(b"\0" * _HEADER_BYTES)

  def append(self, rows: np.ndarray) -> None:
    self._file.write(np.ascontiguousarray(rows, self.dtype).tobytes())
    self.rows += len(rows)

  def close(self) -> None:
    descr = np.lib.format.dtype_to_descr(self.dtype)
    header = (
      f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({self.rows}, {self.width}), }}"
    )
    magic = b"\x93NUMPY\x01\x00"
    body_len = _HEADER_BYTES - len(magic) - 2
    header = header.ljust(body_len - 1) + "\n"  # NPY 1.0: space-padded, newline-terminated
    self._file.seek(0)
    self._file.write(magic + body_len.to_bytes(2, "little") + header.encode("latin1"))
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 22):
      h.update(block)
  return h.hexdigest()


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
