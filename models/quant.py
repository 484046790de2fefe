"""Low-precision matmuls for the projections (``model.quant``): fp8 or int8, forward and backward.

``matmul(x_TI, w_IO, quant)`` is ``x · w`` over one token axis T (``models/layers.py``'s
``dense`` merges batch and length first). Its three matmuls — ``y = x·w`` forward, ``dx = dy·wᵀ``
and ``dw = xᵀ·dy`` backward — each take both operands in the low format:

- ``fp8``, current (just-in-time) rowwise scaling (torchao's and torchtitan's "rowwise" float8
  recipe): each operand is scaled per row or column that the dot does not contract, by
  ``FP8_MAX / amax(|row|)`` of that very tensor, and cast to float8_e4m3fn (activations,
  weights) or float8_e5m2 (the output gradient: more range, less precision); the dot takes the
  fp8 operands themselves, sums in float32, and the two scale vectors are applied to its result
  (an outer product). Tensorwise scaling (one scale per operand) left the default run's eval loss
  2.0-2.6% above the unquantised run's; rowwise, 0.9% (docs/gpus.md). No state: no amax
  history to checkpoint, and a resumed run is the same program. On an H100/H200 XLA compiles
  each such dot to an fp8 GEMM (a Triton GEMM on fp8 operands, merging those that share an
  input, or cuBLASLt's ``__cublas$lt$matmul$f8``: ``train.plan`` counts them); other backends
  widen the fp8 operands exactly (a product of two fp8 values is exact in float32), so the CPU
  emulation rounds as the GPU does. The quantise-dequantise form (fp8 cast back and scaled
  before a bf16 dot) compiled to bf16 GEMMs on the rounded operands (docs/gpus.md).
- ``int8``, per-channel symmetric scaling with int32 accumulation (the AQT/Qwix recipe for
  TPUs): each operand is scaled per row or column that the dot does not contract (per token for
  the activations and the gradients in the forward and input-gradient dots, per output or input
  channel for the weight; in the weight gradient x^T·dy, per input channel of x and per output
  channel of dy, each over all tokens), rounded to int8, and
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


def _fp8(a: jax.Array, dtype, contracted: int) -> tuple[jax.Array, jax.Array]:
  """``a`` in the fp8 ``dtype`` under rowwise current scaling, and its float32 scales
  (``a ≈ q * scale``): one per index of the kept axis, shared along the ``contracted`` one."""
  amax = jnp.max(jnp.abs(a), axis=contracted, keepdims=True).astype(jnp.float32)
  limit = float(jnp.finfo(dtype).max)
  scale = jnp.maximum(amax, _TINY) / limit
  return jnp.clip(a.astype(jnp.float32) / scale, -limit, limit).astype(dtype), scale


def _fp8_dot(a, b, dims, a_format, b_format, out_dtype):
  """The dot of the fp8 operands themselves, float32 sums, unscaled after: XLA's GPU compiler
  makes it one fp8 GEMM (a cuBLASLt ``__cublas$lt$matmul$f8`` or a Triton GEMM on fp8 operands),
  and other backends (the CPU emulation) widen the fp8 operands exactly. A product of two fp8
  values is exact in float32, so this is the quantise-dequantise matmul up to summation order;
  that form (fp8 cast back to the wide type and scaled before the dot) compiled to a bf16 GEMM
  on the rounded operands, and its rounding needed a barrier to survive XLA's simplifier."""
  (a_contract,), (b_contract,) = dims[0]
  qa, sa = _fp8(a, a_format, a_contract)
  qb, sb = _fp8(b, b_format, b_contract)
  acc = jax.lax.dot_general(qa, qb, dims, preferred_element_type=jnp.float32)
  return (acc * sa.reshape(-1, 1) * sb.reshape(1, -1)).astype(out_dtype)


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
