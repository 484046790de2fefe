"""The files of a prepared store: .npy shards, their names, checks, reading and writing.

A shard is an ordinary .npy file (a 128-byte header, then rows of ``row_width`` values), so row r
is at byte ``HEADER_BYTES + r * row_bytes``: a memory map reads it locally, a byte-range request
remotely (input_pipeline/store.py explains the layout and why not ArrayRecord).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np

from input_pipeline.errors import StoreError

HEADER_BYTES = 128  # room reserved for the .npy header, which is written once the shape is known


class ShardedArray:
  """One array of one split, in shards: rows read by memory map (local) or byte ranges (remote)."""

  def __init__(self, files: list, rows: list[int], dtype: np.dtype, width: int, maps=None):
    self.files, self.dtype, self.width = files, np.dtype(dtype), width
    self.starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    self.maps = maps  # memory maps of local shards; None: ranges of remote objects
    self.row_bytes = width * self.dtype.itemsize
    self.bytes_read = 0
    self._fs = None

  def __len__(self) -> int:
    return int(self.starts[-1])

  def __getitem__(self, rows_B) -> np.ndarray:
    rows_B = np.asarray(rows_B, np.int64)
    shard_B = np.searchsorted(self.starts, rows_B, side="right") - 1
    local_B = rows_B - self.starts[shard_B]
    out = np.empty((len(rows_B), self.width), self.dtype)
    if self.maps is not None:
      for shard in np.unique(shard_B):
        where = shard_B == shard
        out[where] = self.maps[shard][local_B[where]]
      self.bytes_read += out.nbytes
      return out
    if self._fs is None:
      import fsspec  # noqa: PLC0415 (object stores only)

      self._fs, _ = fsspec.core.url_to_fs(str(self.files[0]))
    paths = [_fs_path(self.files[s]) for s in shard_B]
    starts = [HEADER_BYTES + int(r) * self.row_bytes for r in local_B]
    blobs = self._fs.cat_ranges(paths, starts, [b + self.row_bytes for b in starts])
    for i, blob in enumerate(blobs):
      if isinstance(blob, Exception) or len(blob) != self.row_bytes:
        raise StoreError(f"store shard {self.files[shard_B[i]]}: row {local_B[i]} unreadable")
      out[i] = np.frombuffer(blob, self.dtype)
    self.bytes_read += sum(len(b) for b in blobs)
    return out


def _fs_path(path) -> str:
  return str(path).split("://", 1)[-1]


def shard_name(split: str, name: str, index: int) -> str:
  return f"{split}_{name}.{index:05d}.npy"


def file_bytes(meta: dict) -> int:
  return HEADER_BYTES + math.prod(meta["shape"]) * np.dtype(meta["dtype"]).itemsize


def check_remote(file, meta: dict, hint: str, verify: bool) -> None:
  try:
    size = file.stat().length
  except OSError as e:
    raise StoreError(f"store shard {file} cannot be read ({e}); {hint}") from e
  if size != file_bytes(meta):
    raise StoreError(
      f"store shard {file} holds {size} bytes, the manifest says {file_bytes(meta)}; {hint}"
    )
  if verify:
    h = hashlib.sha256()
    with file.open("rb") as f:
      while block := f.read(1 << 24):
        h.update(block)
    if h.hexdigest() != meta["sha256"]:
      raise StoreError(f"store shard {file} fails its sha256 check (corrupt); {hint}")


def open_local(
  file: Path, meta: dict, rows: int, width: int, hint: str, verify: bool
) -> np.ndarray:
  want_shape = (rows, width)
  try:
    array = np.load(file, mmap_mode="r", allow_pickle=False)  # data only, never code
  except (OSError, ValueError) as e:
    raise StoreError(f"store array {file} cannot be read ({e}); {hint}") from e
  if tuple(array.shape) != want_shape or str(array.dtype) != meta["dtype"]:
    raise StoreError(
      f"store array {file} is {array.dtype}{list(array.shape)}, the manifest says "
      f"{meta['dtype']}{list(want_shape)}; {hint}"
    )
  size, expected = file.stat().st_size, HEADER_BYTES + array.nbytes
  if size != expected:
    raise StoreError(f"store array {file} holds {size} bytes, expected {expected}; {hint}")
  if verify and sha256(file) != meta["sha256"]:
    raise StoreError(f"store array {file} fails its sha256 check (corrupt); {hint}")
  return array


class NpyWriter:
  """Appends rows to a .npy file; the header (with the final row count) is written on close."""

  def __init__(self, path: Path, dtype: np.dtype, width: int):
    self.path, self.dtype, self.width, self.rows = path, np.dtype(dtype), width, 0
    self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
    self._file.write(b"\0" * HEADER_BYTES)

  def append(self, rows: np.ndarray) -> None:
    self._file.write(np.ascontiguousarray(rows, self.dtype).tobytes())
    self.rows += len(rows)

  def close(self) -> None:
    descr = np.lib.format.dtype_to_descr(self.dtype)
    header = (
      f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({self.rows}, {self.width}), }}"
    )
    magic = b"\x93NUMPY\x01\x00"
    body_len = HEADER_BYTES - len(magic) - 2
    header = header.ljust(body_len - 1) + "\n"  # NPY 1.0: space-padded, newline-terminated
    self._file.seek(0)
    self._file.write(magic + body_len.to_bytes(2, "little") + header.encode("latin1"))
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()


def sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(1 << 22):
      h.update(block)
  return h.hexdigest()
