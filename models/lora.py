"""Low-rank adapters (LoRA): a trainable update ``x · A · B · alpha / r`` beside a frozen kernel.

A kernel of shape ``[*in, *out]`` gets ``A [*in, r]`` (normal, std 1/sqrt(fan-in)) and
``B [r, *out]`` (zeros), so a fresh adapter changes nothing. A and B carry the kernel's logical
axis names on their in / out sides, so they shard like the weight they adapt. Parameters whose
path contains ``lora`` are the trainable ones when ``model.lora_rank > 0``; everything else is
frozen (``train/optimizer.py``). ``merge`` folds the adapters into their kernels for export.

Done here rather than with ``flax.nnx.LoRA``: that module adapts 2-D ``nnx.Linear`` kernels,
while Loom's projections keep heads split out (``q`` is ``[D, N, H]``, ``out`` ``[N, H, D]``) and
name every axis for sharding; two tensordots serve every shape.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.params import make_param, normal
from models.sharding import LogicalNames

TARGETS = ("q", "k", "v", "out", "gate", "up", "down")


class LoRA(nnx.Module):
  """The low-rank update of one kernel [*in_shape, *out_shape]."""

  def __init__(
    self,
    cfg: ModelConfig,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    in_names: LogicalNames,
    out_names: LogicalNames,
    *,
    rngs: nnx.Rngs,
  ):
    rank = cfg.lora_rank
    self.dtype = jnp.dtype(cfg.dtype)
    self.in_dims = len(in_shape)
    self.scale = cfg.lora_alpha / rank
    std = 1.0 / math.sqrt(math.prod(in_shape))
    self.a = make_param(rngs, normal(std), (*in_shape, rank), (*in_names, None), cfg)
    self.b = make_param(rngs, nnx.initializers.zeros, (rank, *out_shape), (None, *out_names), cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The update for input x [..., *in]: [..., *out]."""
    h = jnp.tensordot(x, self.a[...].astype(self.dtype), axes=self.in_dims)
    return jnp.tensordot(h, self.b[...].astype(self.dtype), axes=1) * jnp.asarray(
      self.scale, self.dtype
    )


def adapter(
  cfg: ModelConfig, target: str, kernel_shape: tuple[int, ...], names: LogicalNames, in_dims: int,
  rngs: nnx.Rngs,
) -> LoRA | None:  # fmt: skip
  """A LoRA for ``target`` when the config adapts it, else None."""
  if cfg.lora_rank <= 0 or target not in cfg.lora_targets:
    return None
  return LoRA(
    cfg,
    tuple(kernel_shape[:in_dims]),
    tuple(kernel_shape[in_dims:]),
    tuple(names[:in_dims]),
    tuple(names[in_dims:]),
    rngs=rngs,
  )


def is_adapter(path_names: list[str]) -> bool:
  return any("lora" in name for name in path_names)


def merge(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """The parameters with every adapter folded into its kernel (and the adapters removed).

  Works on the pure-dict parameters (stacked [layers, ...] leaves when layers are scanned).
  """
  scale = cfg.lora_alpha / max(cfg.lora_rank, 1)

  def fold(kernel, a, b):
    delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)

  def walk(tree: Any, stacked: bool) -> Any:
    if not isinstance(tree, dict):
      return tree
    out = {}
    for key, value in tree.items():
      if key.endswith("_lora"):
        continue
      stacks = key in ("blocks", "dense_blocks") and cfg.scan_layers
      out[key] = walk(value, stacked or stacks)
    for key, value in tree.items():
      if key.endswith("_lora"):
        kernel_key = key[: -len("_lora")] + "_kernel"
        merge_one = jax.vmap(fold) if stacked else fold
        out[kernel_key] = merge_one(tree[kernel_key], value["a"], value["b"])
    return out

  return walk(params, False)
