"""Multi-head, grouped-query and multi-query causal self-attention, with an optional KV cache.

Shapes: B batch, L query length, S key length, D d_model, N query heads, K kv heads,
G = N // K query heads per kv head, H head_dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import lora
from models.config import ModelConfig
from models.layers import Norm, apply_rope, out_proj_std, rope_frequencies
from models.params import make_param, normal
from models.sharding import constrain

KVCache = dict[str, jax.Array]  # {"k": [B, S, K, H], "v": [B, S, K, H]} for one layer


def causal_segment_mask(segment_ids_BL: jax.Array | None, length: int) -> jax.Array:
  """bool[B or 1, L, L]: query t sees key s iff s <= t (index in the row) and same segment."""
  idx = jnp.arange(length)
  causal_LL = idx[:, None] >= idx[None, :]
  if segment_ids_BL is None:
    return causal_LL[None]
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return causal_LL[None] & same_BLL


def decode_mask(cache_index: jax.Array | int, length: int, cache_len: int) -> jax.Array:
  """bool[1, L, S] for L new tokens written at cache slots cache_index .. cache_index + L - 1.

  A query sees every slot up to its own; later slots are empty (or stale) and stay masked.
  """
  q_slot_L = cache_index + jnp.arange(length)
  k_slot_S = jnp.arange(cache_len)
  return (k_slot_S[None, :] <= q_slot_L[:, None])[None]


class Attention(nnx.Module):
  """Self-attention with q [D, N, H], k/v [D, K, H] and out [N, H, D] kernels."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.num_kv_heads = cfg.num_kv_heads
    # A tuple, not an array: an NNX module keeps arrays only inside Variables.
    self.rope = tuple(rope_frequencies(cfg).tolist()) if cfg.positions == "rope" else None
    self.scale = 1.0 / math.sqrt(cfg.head_dim)
    self.block = cfg.attention_block
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    init = normal(cfg.init_std)
    self.q_kernel = make_param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), cfg)
    self.k_kernel = make_param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
    self.v_kernel = make_param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
    self.out_kernel = make_param(
      rngs, normal(out_proj_std(cfg)), (n, h, d), ("heads", "head_dim", "embed"), cfg
    )
    kv_names = ("embed", "kv_heads", "head_dim")
    self.q_lora = lora.adapter(cfg, "q", (d, n, h), ("embed", "heads", "head_dim"), 1, rngs)
    self.k_lora = lora.adapter(cfg, "k", (d, k, h), kv_names, 1, rngs)
    self.v_lora = lora.adapter(cfg, "v", (d, k, h), kv_names, 1, rngs)
    self.out_lora = lora.adapter(cfg, "out", (n, h, d), ("heads", "head_dim", "embed"), 2, rngs)
    zeros = nnx.initializers.zeros
    if cfg.use_bias or cfg.qkv_bias:
      self.q_bias = make_param(rngs, zeros, (n, h), ("heads", "head_dim"), cfg)
      self.k_bias = make_param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), cfg)
      self.v_bias = make_param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), cfg)
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    self.out_bias = make_param(rngs, zeros, (d,), ("embed",), cfg) if cfg.use_bias else None
    if cfg.qk_norm:
      norm_args = dict(kind="rms", use_bias=False, rngs=rngs)
      self.q_norm = Norm(cfg, h, ("head_dim",), **norm_args)
      self.k_norm = Norm(cfg, h, ("head_dim",), **norm_args)
    else:
      self.q_norm = self.k_norm = None

  def _project(self, x_BLD: jax.Array, kernel: nnx.Param, bias, adapter) -> jax.Array:
    y_BLnH = jnp.einsum("BLD,DnH->BLnH", x_BLD, kernel[...].astype(self.dtype))
    if adapter is not None:
      y_BLnH = y_BLnH + adapter(x_BLD)
    return y_BLnH if bias is None else y_BLnH + bias[...].astype(self.dtype)

  def __call__(
    self,
    x_BLD: jax.Array,
    positions_BL: jax.Array,
    mask_BLS: jax.Array,
    cache: KVCache | None = None,
    cache_index: jax.Array | int | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Attends x to itself (cache None) or to the cache after writing x's keys at cache_index.

    mask_BLS: bool, broadcastable to [B, L, S]; True where query L may attend to key S.
    Returns the output [B, L, D] and the updated cache (None without one).
    """
    q_BLNH = self._project(x_BLD, self.q_kernel, self.q_bias, self.q_lora)
    k_BLKH = self._project(x_BLD, self.k_kernel, self.k_bias, self.k_lora)
    v_BLKH = self._project(x_BLD, self.v_kernel, self.v_bias, self.v_lora)
    if self.q_norm is not None:
      # QK-norm acts on the raw projections, before RoPE (as in OLMo 2 / Qwen 3).
      q_BLNH, k_BLKH = self.q_norm(q_BLNH), self.k_norm(k_BLKH)
    if self.rope is not None:
      inv_freq_h = np.asarray(self.rope, np.float32)
      q_BLNH = apply_rope(q_BLNH, positions_BL, inv_freq_h)
      k_BLKH = apply_rope(k_BLKH, positions_BL, inv_freq_h)
    q_BLNH = constrain(q_BLNH, ("batch", "length", "heads", "head_dim"))
    k_BLKH = constrain(k_BLKH, ("batch", "length", "kv_heads", "head_dim"))
    v_BLKH = constrain(v_BLKH, ("batch", "length", "kv_heads", "head_dim"))

    if cache is not None:
      start = (0, cache_index, 0, 0)
      cache = {
        "k": jax.lax.dynamic_update_slice(cache["k"], k_BLKH.astype(cache["k"].dtype), start),
        "v": jax.lax.dynamic_update_slice(cache["v"], v_BLKH.astype(cache["v"].dtype), start),
      }
      k_BSKH, v_BSKH = cache["k"].astype(self.dtype), cache["v"].astype(self.dtype)
    else:
      k_BSKH, v_BSKH = k_BLKH, v_BLKH

    length = q_BLNH.shape[1]
    if cache is None and 0 < self.block < length:
      out_BLNH = self._attend_blocked(q_BLNH, k_BSKH, v_BSKH, mask_BLS)
    else:
      out_BLNH = self._attend(q_BLNH, k_BSKH, v_BSKH, mask_BLS)
    y_BLD = jnp.einsum("BLNH,NHD->BLD", out_BLNH, self.out_kernel[...].astype(self.dtype))
    if self.out_lora is not None:
      y_BLD = y_BLD + self.out_lora(out_BLNH)
    if self.out_bias is not None:
      y_BLD = y_BLD + self.out_bias[...].astype(self.dtype)
    return y_BLD, cache

  def _attend(self, q_BLNH, k_BSKH, v_BSKH, mask_BLS) -> jax.Array:
    """Softmax attention of every query row over all S keys (masked): [B, L, N, H]."""
    b, length, n, h = q_BLNH.shape
    kv = self.num_kv_heads
    # Grouped-query attention without repeating k/v: split the query heads into [K, G].
    q_BLKGH = (q_BLNH * jnp.asarray(self.scale, self.dtype)).reshape(b, length, kv, n // kv, h)
    logits_BKGLS = jnp.einsum(
      "BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH, preferred_element_type=jnp.float32
    )
    mask_B11LS = mask_BLS[:, None, None, :, :]
    logits_BKGLS = jnp.where(mask_B11LS, logits_BKGLS, jnp.finfo(jnp.float32).min)
    probs_BKGLS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(self.dtype)
    out_BLKGH = jnp.einsum("BKGLS,BSKH->BLKGH", probs_BKGLS, v_BSKH)
    return out_BLKGH.reshape(b, length, n, h)

  def _attend_blocked(self, q_BLNH, k_BSKH, v_BSKH, mask_BLS) -> jax.Array:
    """Causal attention by blocks of ``attention_block`` queries, each over the keys up to its
    own end: the key blocks above the diagonal, masked anyway, are never computed (about half
    the score and value FLOPs and memory at long rows). Exact: the same softmax per row."""
    length = q_BLNH.shape[1]
    outs = []
    for lo in range(0, length, self.block):
      hi = min(lo + self.block, length)
      mask = mask_BLS[:, lo:hi, :hi]
      outs.append(self._attend(q_BLNH[:, lo:hi], k_BSKH[:, :hi], v_BSKH[:, :hi], mask))
    return jnp.concatenate(outs, axis=1)
