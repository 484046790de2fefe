"""Building blocks: norms, embeddings, rotary positions and the MLP.

Parameters live in ``cfg.param_dtype`` and are cast to the compute ``cfg.dtype`` where they are
used; every parameter carries logical axis names (see models/sharding.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models import lora
from models import quant as quant_lib
from models.config import ModelConfig
from models.params import make_param, normal
from models.sharding import LogicalNames, active_axes, constrain


def out_proj_std(cfg: ModelConfig) -> float:
  """Std of the projections that write into the residual stream (attention out, MLP out).

  GPT-2 scales them by 1/sqrt(2 * num_layers) so the residual stream's variance does not grow
  with depth (two residual additions per block); Loom does the same for every architecture.
  """
  return cfg.init_std / math.sqrt(2 * cfg.num_layers)


def dense(
  x: jax.Array,
  kernel: jax.Array,
  contract: int = 1,
  kernel_axes=None,
  quant: str = "none",
  **dot_kwargs,
) -> jax.Array:
  """x [B, L, *in] · kernel [*in, *out] -> [B, L, *out], contracting x's last ``contract`` axes
  with the kernel's first ones (or its ``kernel_axes``: (1,) for a [V, D] table used as [D, V]).

  B and L are merged into one token axis first (a free reshape of adjacent row-major axes), so
  the weight gradient is one matmul over a single token axis. With B and L apart, XLA's dot
  canonicalisation first copies the activations into a transposed [*in, B·L] buffer for every
  kernel gradient; on XLA:CPU that strided copy cost a fifth of config R's train step. When
  "length" is split (a sequence- or context-parallel mesh axis) the axes stay apart, as the
  mesh splits them.

  ``quant`` "fp8" or "int8" runs the forward and both backward matmuls in that format
  (``models/quant.py``) on the merged [tokens, in] x [in, out] form, whatever the sharding.
  """
  lead, inner = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
  kernel_axes = tuple(range(contract)) if kernel_axes is None else tuple(kernel_axes)
  if quant != "none":
    if kernel_axes != tuple(range(contract)):
      raise ValueError(f"quantised dense() takes kernels [*in, *out] (kernel_axes={kernel_axes})")
    out = kernel.shape[contract:]
    y_TO = quant_lib.matmul(
      x.reshape(math.prod(lead), math.prod(inner)),
      kernel.reshape(math.prod(inner), math.prod(out)),
      quant,
      dot_kwargs.get("preferred_element_type"),
    )
    return y_TO.reshape(*lead, *out)
  if len(lead) != 2 or active_axes(("batch", "length"), 1)[1] > 1:
    axes = (tuple(range(len(lead), x.ndim)), kernel_axes)
    return jax.lax.dot_general(x, kernel, (axes, ((), ())), **dot_kwargs)
  if kernel_axes == tuple(range(contract)):
    # One [I, O] matrix (free reshapes; the rules shard only the major one of merged axes, as
    # heads before head_dim): the weight gradient is then x^T · dy straight into the kernel's
    # layout. With several out axes ([D, N, H]) XLA computed it transposed, as [N, H, D], and
    # first copied dy into a transposed [N·H, B·L] buffer (config R: 4% of the step on a CPU).
    out = kernel.shape[contract:]
    x_TI = x.reshape(math.prod(lead), math.prod(inner))
    kernel = kernel.reshape(math.prod(inner), math.prod(out))
    y_TO = jax.lax.dot_general(x_TI, kernel, (((1,), (0,)), ((), ())), **dot_kwargs)
    return y_TO.reshape(*lead, *out)
  x_TI = x.reshape(math.prod(lead), *inner)
  axes = (tuple(range(1, 1 + contract)), kernel_axes)
  y_TO = jax.lax.dot_general(x_TI, kernel, (axes, ((), ())), **dot_kwargs)
  return y_TO.reshape(*lead, *y_TO.shape[1:])


class Norm(nnx.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32, with an optional bias."""

  def __init__(
    self,
    cfg: ModelConfig,
    features: int,
    names: LogicalNames,
    *,
    kind: str,
    use_bias: bool,
    rngs: nnx.Rngs,
  ):
    self.kind = kind
    self.eps = cfg.norm_eps
    self.dtype = jnp.dtype(cfg.dtype)
    self.scale = make_param(rngs, nnx.initializers.ones, (features,), names, cfg)
    self.bias = (
      make_param(rngs, nnx.initializers.zeros, (features,), names, cfg) if use_bias else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    # Statistics in float32: bf16 sums of squares lose too much precision.
    x32 = x.astype(jnp.float32)
    if self.kind == "layer":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Embed(nnx.Module):
  """A lookup table [rows, D]; tokens ("vocab", "embed") or learned positions ("length", ...)."""

  def __init__(self, cfg: ModelConfig, rows: int, names: LogicalNames, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.table = make_param(rngs, normal(cfg.init_std), (rows, cfg.d_model), names, cfg)

  def __call__(self, ids_BL: jax.Array) -> jax.Array:
    return jnp.take(self.table[...], ids_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    """Tied unembedding: logits in float32 (fp32 accumulation of the compute-dtype matmul)."""
    table_VD = self.table[...].astype(self.dtype)
    return dense(x_BLD, table_VD, kernel_axes=(1,), preferred_element_type=jnp.float32)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """float32[head_dim // 2]: the inverse frequency of each rotated pair, theta^(-2i/H).

  With ``rope_scaling="llama3"`` (Llama 3.1/3.2), wavelengths longer than
  original_max_len / low_freq_factor are stretched by the factor, those shorter than
  original_max_len / high_freq_factor are kept, and the ones between are blended smoothly.
  Computed with numpy: a constant of the compiled program.
  """
  half = cfg.head_dim // 2
  inv_freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
  if cfg.rope_scaling == "llama3":
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_len
    wavelen = 2 * np.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(
      wavelen > original / low,
      inv_freq / factor,
      np.where(wavelen < original / high, inv_freq, blended),
    )
  return inv_freq.astype(np.float32)


def apply_rope(x_BLNH: jax.Array, positions_BL: jax.Array, inv_freq_h: np.ndarray) -> jax.Array:
  """Rotary position embedding, Hugging Face Llama's "rotate_half" convention.

  Dimension i of the first half of head_dim pairs with dimension i of the second half, rotated
  by positions * inv_freq_h[i] (``rope_frequencies``); computed in float32 and cast back.
  """
  half = x_BLNH.shape[-1] // 2
  angles_BLh = positions_BL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
  cos_BL1h = jnp.cos(angles_BLh)[:, :, None, :]
  sin_BL1h = jnp.sin(angles_BLh)[:, :, None, :]
  x32 = x_BLNH.astype(jnp.float32)
  x1, x2 = x32[..., :half], x32[..., half:]
  out = jnp.concatenate([x1 * cos_BL1h - x2 * sin_BL1h, x2 * cos_BL1h + x1 * sin_BL1h], axis=-1)
  return out.astype(x_BLNH.dtype)


class MLP(nnx.Module):
  """SwiGLU (silu(x W_gate) * x W_up) W_down, or GELU (tanh approximation, GPT-2's gelu_new)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.mlp
    self.dtype = jnp.dtype(cfg.dtype)
    self.quant = cfg.quant
    d, f = cfg.d_model, cfg.mlp_dim
    init = normal(cfg.init_std)
    self.up_kernel = make_param(rngs, init, (d, f), ("embed", "mlp"), cfg)
    self.gate_kernel = (
      make_param(rngs, init, (d, f), ("embed", "mlp"), cfg) if cfg.mlp == "swiglu" else None
    )
    self.down_kernel = make_param(rngs, normal(out_proj_std(cfg)), (f, d), ("mlp", "embed"), cfg)
    zeros = nnx.initializers.zeros
    self.up_bias = make_param(rngs, zeros, (f,), ("mlp",), cfg) if cfg.use_bias else None
    self.gate_bias = (
      make_param(rngs, zeros, (f,), ("mlp",), cfg) if cfg.use_bias and cfg.mlp == "swiglu" else None
    )
    self.down_bias = make_param(rngs, zeros, (d,), ("embed",), cfg) if cfg.use_bias else None
    self.up_lora = lora.adapter(cfg, "up", (d, f), ("embed", "mlp"), 1, rngs)
    self.gate_lora = (
      lora.adapter(cfg, "gate", (d, f), ("embed", "mlp"), 1, rngs) if cfg.mlp == "swiglu" else None
    )
    self.down_lora = lora.adapter(cfg, "down", (f, d), ("mlp", "embed"), 1, rngs)

  def _in(self, x_BLD: jax.Array, kernel: nnx.Param, bias, adapter) -> jax.Array:
    h_BLF = dense(x_BLD, kernel[...].astype(self.dtype), quant=self.quant)
    if adapter is not None:
      h_BLF = h_BLF + adapter(x_BLD)
    return h_BLF if bias is None else h_BLF + bias[...].astype(self.dtype)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    # "mlp" names the input projections' outputs for the remat policies that keep them
    # (models/transformer.py): the backward pass then reruns only the elementwise activation.
    h_BLF = checkpoint_name(self._in(x_BLD, self.up_kernel, self.up_bias, self.up_lora), "mlp")
    if self.gate_kernel is not None:
      gate_BLF = self._in(x_BLD, self.gate_kernel, self.gate_bias, self.gate_lora)
      h_BLF = jax.nn.silu(checkpoint_name(gate_BLF, "mlp")) * h_BLF
    else:
      h_BLF = jax.nn.gelu(h_BLF, approximate=True)
    h_BLF = constrain(h_BLF, ("batch", "length", "mlp"))
    y_BLD = dense(h_BLF, self.down_kernel[...].astype(self.dtype), quant=self.quant)
    if self.down_lora is not None:
      y_BLD = y_BLD + self.down_lora(h_BLF)
    if self.down_bias is not None:
      y_BLD = y_BLD + self.down_bias[...].astype(self.dtype)
    return y_BLD
