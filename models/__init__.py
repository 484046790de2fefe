"""Loom's model: a decoder-only transformer in Flax NNX, configured by a frozen ModelConfig."""

from models import flax_import

flax_import.load()  # before any module below imports Flax: without IPython where none runs

from models.config import ModelConfig  # noqa: E402
from models.param_count import lora_count, param_count  # noqa: E402
from models.transformer import CACHE_AXES, Block, Transformer  # noqa: E402

__all__ = ["CACHE_AXES", "Block", "ModelConfig", "Transformer", "lora_count", "param_count"]
