"""How the next token is chosen: the sampling parameters and the pure sampling functions.

Temperature (0 = greedy), then top-k, then top-p (nucleus). The functions are pure and jit-friendly
(``Sampling`` is hashable, so it can be a static argument); ``train/inference/engine.py``
compiles them into its decode step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
      raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} is negative; use 0 (greedy) or more")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
    if not (0.0 < self.top_p <= 1.0):
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filter_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
  """Tempered logits with everything outside the top-k and the top-p nucleus set to -inf.

  Tokens tied with the last one kept are kept too, so a set may exceed k (or the nucleus) on ties.
  """
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  if 0 < sampling.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1.0:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token if the mass before it is below top_p: the smallest set reaching top_p.
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < sampling.top_p
    last_B1 = jnp.sum(keep_BV, axis=-1, keepdims=True) - 1
    threshold_B1 = jnp.take_along_axis(sorted_BV, last_B1, axis=-1)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample(logits_BV: jax.Array, keys_B: jax.Array, sampling: Sampling) -> jax.Array:
  """int32[B] next tokens; keys_B holds one typed PRNG key per row."""
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filter_logits(logits_BV, sampling)
  return jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)
