"""Loom's model: a decoder-only transformer in Flax NNX, configured by a frozen ModelConfig."""

from models.config import ModelConfig
from models.param_count import param_count
from models.transformer import CACHE_AXES, Block, Transformer

__all__ = ["CACHE_AXES", "Block", "ModelConfig", "Transformer", "param_count"]
