"""Low-precision matmuls for the projections (``model.quant``): fp8 or int8, forward and backward.

``matmul(x_TI, w_IO, quant)`` is ``x · w`` over one token axis T (``models/layers.py``'s
``dense`` merges batch and length first). Its three matmuls — ``y = x·w`` forward, ``dx = dy·wᵀ``
and ``dw = xᵀ·dy`` backward — each take both operands in the low format:

- ``fp8``, current (just-in-time) tensorwise scaling, the recipe torchtitan trains Llama 3 with:
  each operand is scaled by ``FP8_MAX / amax(|operand|)`` of that very tensor, cast to
  float8_e4m3fn (activations, weights) or float8_e5m2 (the output gradient: more range, less
  precision), and cast back and unscaled just before a dot that accumulates in float32: an exact
  emulation of the fp8 rounding on every backend. No state: no amax history to checkpoint, and a
  resumed run is the same program. Not yet a speed-up on GPUs: XLA rewrites such a
  quantise-dequantise pattern into one cuBLASLt fp8 GEMM (``__cublas$lt$matmul$f8``) only when
  the scales are fixed (measured on an H200: a constant scale gives the fp8 GEMM at 786-826
  TFLOP/s against bf16's 703; a scale computed from the tensor gives a bf16 GEMM), so fp8 here
  runs bf16 GEMMs on rounded operands (docs/gpus.md). Delayed scaling, whose scales are inputs of
  the step, is the way to the fp8 GEMM.
- ``int8``, per-channel symmetric scaling with int32 accumulation (the AQT/Qwix recipe for
  TPUs): each operand is scaled per row or column that the dot does not contract (per token for
  activations and gradients, per output or input channel for the weight), rounded to int8, and
  multiplied as int8 x int8 -> int32 (native on TPUs and on NVIDIA tensor cores); the int32 sum
  times the two scales is the float result. Contracted axes share one scale, so it factors out.

Gradients pass straight through the rounding (the quantiser's derivative is taken as 1), as in
every quantised-training recipe. Nothing else changes: parameters, optimizer state and the
residual stream keep their dtypes; norms, softmax, the loss and the unembedding stay as they are.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

QUANTS = ("none", "fp8", "int8")
FP8_FORWARD = jnp.float8_e4m3fn  # activations and weights: 3 mantissa bits, max 448
FP8_BACKWARD = jnp.float8_e5m2  # output gradients: 2 mantissa bits, max 57344
INT8_MAX = 127.0
_TINY = 1e-12  # an all-zero operand gets a finite scale


def _fp8_qdq(a: jax.Array, dtype) -> jax.Array:
  """``a`` rounded to the fp8 ``dtype`` under tensorwise current scaling, back in a's dtype.

  Written as XLA's GPU compiler expects a dequantised fp8 operand (convert to the wide type, then
  multiply by a scalar scale), so that the dot it feeds becomes one fp8 GEMM there."""
  amax = jnp.max(jnp.abs(a)).astype(jnp.float32)
  limit = float(jnp.finfo(dtype).max)
  scale = jnp.maximum(amax, _TINY) / limit  # a = q * scale
  q = jnp.clip(a.astype(jnp.float32) / scale, -limit, limit).astype(dtype)
  # The barrier keeps the rounding: XLA's GPU simplifier otherwise drops the cast to fp8 and back
  # (compiled for an H100: no f8 left in the program; the H200 runs of docs/gpus.md were unrounded).
  q, scale = jax.lax.optimization_barrier((q, scale))
  return q.astype(a.dtype) * scale.astype(a.dtype)


def _fp8_dot(a, b, dims, a_format, b_format, out_dtype):
  qa, qb = _fp8_qdq(a, a_format), _fp8_qdq(b, b_format)
  return jax.lax.dot_general(qa, qb, dims, preferred_element_type=jnp.float32).astype(out_dtype)


def _int8(a: jax.Array, contracted: int) -> tuple[jax.Array, jax.Array]:
  """int8 values and float32 scales (one per index of the kept axis) of a 2-D ``a``, symmetric,
  with the scale shared along the ``contracted`` axis."""
  a32 = a.astype(jnp.float32)
  scale = jnp.maximum(jnp.max(jnp.abs(a32), axis=contracted, keepdims=True), _TINY) / INT8_MAX
  return jnp.round(a32 / scale).astype(jnp.int8), scale


def _int8_dot(a, b, a_contract: int, b_contract: int, out_dtype):
  """2-D ``a`` · ``b`` contracting ``a``'s axis ``a_contract`` with ``b``'s ``b_contract``."""
  qa, sa = _int8(a, a_contract)
  qb, sb = _int8(b, b_contract)
  dims = (((a_contract,), (b_contract,)), ((), ()))
  acc = jax.lax.dot_general(qa, qb, dims, preferred_element_type=jnp.int32)
  # acc is [a's kept axis, b's kept axis]; the scales broadcast along those axes.
  sa_row = sa.reshape(-1, 1)
  sb_col = sb.reshape(1, -1)
  return (acc.astype(jnp.float32) * sa_row * sb_col).astype(out_dtype)


def _forward(x_TI, w_IO, quant, out_dtype):
  if quant == "fp8":
    return _fp8_dot(x_TI, w_IO, (((1,), (0,)), ((), ())), FP8_FORWARD, FP8_FORWARD, out_dtype)
  return _int8_dot(x_TI, w_IO, 1, 0, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x_TI, w_IO, quant, out_dtype):
  return _forward(x_TI, w_IO, quant, out_dtype)


def _matmul_fwd(x_TI, w_IO, quant, out_dtype):
  return _forward(x_TI, w_IO, quant, out_dtype), (x_TI, w_IO)


def _matmul_bwd(quant, out_dtype, residuals, dy_TO):
  x_TI, w_IO = residuals
  if quant == "fp8":
    # dx = dy·wᵀ contracts O; dw = xᵀ·dy contracts T. The gradient in e5m2, the rest in e4m3.
    dx = _fp8_dot(dy_TO, w_IO, (((1,), (1,)), ((), ())), FP8_BACKWARD, FP8_FORWARD, x_TI.dtype)
    dw = _fp8_dot(x_TI, dy_TO, (((0,), (0,)), ((), ())), FP8_FORWARD, FP8_BACKWARD, w_IO.dtype)
  else:
    dx = _int8_dot(dy_TO, w_IO, 1, 1, x_TI.dtype)  # per token of dy, per input channel of w
    dw = _int8_dot(x_TI, dy_TO, 0, 0, w_IO.dtype)  # per input channel of x, per output of dy
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x_TI: jax.Array, w_IO: jax.Array, quant: str, out_dtype=None) -> jax.Array:
  """x [T, I] · w [I, O] -> [T, O] in ``out_dtype`` (default x's), with ``quant`` ("none",
  "fp8" or "int8") for the forward and both backward matmuls."""
  out_dtype = jnp.dtype(out_dtype or x_TI.dtype)
  if quant == "none":
    dims = (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(x_TI, w_IO, dims, preferred_element_type=out_dtype)
  if quant not in QUANTS:
    raise ValueError(f"model.quant={quant!r} is not one of {QUANTS}")
  return _matmul(x_TI, w_IO, quant, out_dtype)
