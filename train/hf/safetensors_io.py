"""Hugging Face checkpoint directories, read and written with ``safetensors`` (no pickle, no torch).

``HFCheckpoint(dir)`` opens ``config.json`` and the weights (``model.safetensors`` or the shards of
``model.safetensors.index.json``) lazily: ``tensor(name)`` reads one tensor, and nothing else,
from its file. ``write_shards`` writes tensors one at a time into shards of at most
``max_shard_bytes`` with the standard index, so an export never holds more than one shard.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from train.hf.families import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class HFCheckpoint:
  """A local HF model directory: its config.json and its tensors, read one at a time."""

  def __init__(self, path: str):
    self.path = os.path.abspath(os.path.expanduser(path))
    config_path = os.path.join(self.path, "config.json")
    if not os.path.isfile(config_path):
      raise ConversionError(
        f"{self.path} has no config.json: pass a Hugging Face model directory (config.json and "
        f"{SINGLE} or {INDEX})"
      )
    with open(config_path, encoding="utf-8") as f:
      self.config: dict[str, Any] = json.load(f)
    self.files = self._index()
    self._open: dict[str, Any] = {}

  def _index(self) -> dict[str, str]:
    """Tensor name -> the file that holds it."""
    index_path = os.path.join(self.path, INDEX)
    if os.path.isfile(index_path):
      with open(index_path, encoding="utf-8") as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ConversionError(
            f"{index_path} is not a safetensors index (no JSON object with a weight_map: {e})"
          ) from e
      return {name: os.path.join(self.path, file) for name, file in weight_map.items()}
    single = os.path.join(self.path, SINGLE)
    if not os.path.isfile(single):
      raise ConversionError(
        f"{self.path} has neither {SINGLE} nor {INDEX} (only safetensors weights are read; "
        "convert .bin checkpoints with transformers first)"
      )
    with safe_open(single, framework="numpy") as f:
      return dict.fromkeys(f.keys(), single)

  def stored_name(self, name: str) -> str:
    """The stored name of a tensor; GPT-2 checkpoints come with and without "transformer."."""
    if name in self.files:
      return name
    short = name.split(".", 1)[1] if name.startswith("transformer.") else None
    if short in self.files:
      return short
    raise ConversionError(f"{self.path}: tensor {name!r} is missing from the checkpoint")

  def has(self, name: str) -> bool:
    try:
      self.stored_name(name)
    except ConversionError:
      return False
    return True

  def tensor(self, name: str) -> np.ndarray:
    stored = self.stored_name(name)
    file = self.files[stored]
    if file not in self._open:
      self._open[file] = safe_open(file, framework="numpy")
    return self._open[file].get_tensor(stored)

  def shape(self, name: str) -> tuple[int, ...]:
    stored = self.stored_name(name)
    file = self.files[stored]
    if file not in self._open:
      self._open[file] = safe_open(file, framework="numpy")
    return tuple(self._open[file].get_slice(stored).get_shape())


def write_shards(
  tensors: Iterable[tuple[str, np.ndarray]], out_dir: str, *, max_shard_bytes: int
) -> list[str]:
  """Writes (name, array) pairs into safetensors shards (one file when all fit); returns names."""
  written: list[str] = []
  shard: dict[str, np.ndarray] = {}
  size = 0

  def flush() -> None:
    name = f"shard-{len(written) + 1:05d}.safetensors"
    save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
    written.append(name)

  for name, array in tensors:
    if shard and size + array.nbytes > max_shard_bytes:
      flush()
      shard, size = {}, 0
    shard[name] = np.ascontiguousarray(array)
    size += array.nbytes
  flush()
  return _name_shards(out_dir, written)


def _name_shards(out_dir: str, written: list[str]) -> list[str]:
  """Renames the shards to their final names and writes the index (several shards only)."""
  if len(written) == 1:
    os.replace(os.path.join(out_dir, written[0]), os.path.join(out_dir, SINGLE))
    return [SINGLE]
  total = len(written)
  weight_map: dict[str, str] = {}
  size = 0
  final_names = []
  for number, temporary in enumerate(written, start=1):
    final = f"model-{number:05d}-of-{total:05d}.safetensors"
    os.replace(os.path.join(out_dir, temporary), os.path.join(out_dir, final))
    with safe_open(os.path.join(out_dir, final), framework="numpy") as f:
      weight_map.update(dict.fromkeys(f.keys(), final))  # noqa: SIM118 (safe_open is no dict)
    size += os.path.getsize(os.path.join(out_dir, final))
    final_names.append(final)
  index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
  with open(os.path.join(out_dir, INDEX), "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return final_names
