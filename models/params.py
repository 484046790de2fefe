"""Creating parameters: in ``cfg.param_dtype``, named by logical axes (see models/sharding.py)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig
from models.sharding import LogicalNames, partitioned


def make_param(
  rngs: nnx.Rngs,
  initializer: nnx.Initializer,
  shape: tuple[int, ...],
  names: LogicalNames,
  cfg: ModelConfig,
) -> nnx.Param:
  """Creates an ``nnx.Param`` of ``shape`` in ``cfg.param_dtype`` named by logical axes."""
  init = partitioned(initializer, names)
  return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)))


def normal(std: float) -> nnx.Initializer:
  return nnx.initializers.normal(stddev=std)
