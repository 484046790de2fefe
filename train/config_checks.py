"""Validation of a resolved config against the devices, once, before anything is compiled.

Every message names the key, its value and what would be valid.
"""

from __future__ import annotations

import math
import os

import jax
from jax.sharding import Mesh

from models.config import ModelConfig
from train import mesh as mesh_lib

SPIKE_POLICIES = ("off", "skip", "rollback")


def _positive(config, keys: list[str]) -> None:
  for key in keys:
    group, name = key.split(".")
    value = config[group][name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{key}={value!r} must be a positive integer")


def _non_negative(config, keys: list[str]) -> None:
  for key in keys:
    group, name = key.split(".")
    value = config[group][name]
    if not isinstance(value, int) or value < 0:
      raise ValueError(f"{key}={value!r} must be a non-negative integer (0 = off)")


def check_config(config, mesh: Mesh, rules, process_count: int) -> None:
  """Checks the train, batch and mesh keys that need no model or data to judge."""
  _positive(
    config,
    [
      "train.steps",
      "train.batch_size",
      "train.microbatches",
      "log.every",
      "checkpoint.max_to_keep",
      "train.eval_batches",
      "data.seq_len",
    ],
  )
  _non_negative(config, ["train.eval_every", "checkpoint.every"])
  _positive(config, ["train.max_consecutive_skips"])
  _non_negative(config, ["train.max_rollbacks"])
  if config.train.spike_policy not in SPIKE_POLICIES:
    raise ValueError(
      f"train.spike_policy={config.train.spike_policy!r} is not one of {SPIKE_POLICIES}"
    )
  if config.train.spike_policy != "off" and not config.train.spike_factor > 1:
    raise ValueError(
      f"train.spike_factor={config.train.spike_factor!r} must be > 1 (a loss that many times "
      f"the running mean is a spike), or set train.spike_policy='off'"
    )
  bad_steps = [s for s in config.debug.nan_steps if not isinstance(s, int) or s < 1]
  if bad_steps:
    raise ValueError(f"debug.nan_steps={tuple(config.debug.nan_steps)} must hold step numbers >= 1")
  batch, micro = config.train.batch_size, config.train.microbatches
  dp = mesh_lib.data_parallel_size(mesh, rules)
  if batch % (dp * micro):
    axes = mesh_lib.describe(mesh)
    raise ValueError(
      f"train.batch_size={batch} is not divisible by the data-parallel size {dp} ({axes}) × "
      f"train.microbatches={micro} = {dp * micro}; use a multiple of {dp * micro}"
    )
  if batch % process_count:
    raise ValueError(
      f"train.batch_size={batch} is not divisible by the {process_count} processes; each "
      f"process reads an equal share"
    )


def check_model_on_mesh(model_cfg: ModelConfig, mesh: Mesh, rules) -> None:
  """Head counts against the mesh axes that split heads (all parameter shapes are checked later)."""
  for name, logical in (("num_heads", "heads"), ("num_kv_heads", "kv_heads")):
    value = getattr(model_cfg, name)
    split, axes = mesh_lib.ways(mesh, rules, logical)
    if value % split:
      raise ValueError(
        f"model.{name}={value} is not divisible by {split}, the size of mesh axes {axes} that "
        f"split {logical!r} ({mesh_lib.describe(mesh)}); use mesh sizes whose product divides "
        f"{value}"
      )


def check_workdir(workdir: str) -> str:
  """Creates the work directory if needed; refuses files and unwritable places."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a directory; pass a directory path")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir {workdir} cannot be created: {e.strerror}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {workdir} is not writable by this user; choose another directory")
  return workdir


def check_divisible_shardings(abstract_state, mesh: Mesh) -> None:
  """Every sharded dimension of every parameter divides evenly over its mesh axes."""

  def check(path, leaf):
    spec = leaf.sharding.spec
    for dim, (size, axes) in enumerate(
      zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec)), strict=True)
    ):
      if axes is None:
        continue
      names = (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(mesh.shape[name] for name in names)
      if size % ways:
        where = jax.tree_util.keystr(path)
        raise ValueError(
          f"parameter {where} has shape {leaf.shape}: dimension {dim} (size {size}) cannot be "
          f"split {ways} ways over mesh axes {names} ({mesh_lib.describe(mesh)}); change the "
          f"model size or the mesh so that {ways} divides {size}"
        )

  jax.tree_util.tree_map_with_path(check, abstract_state["params"])
