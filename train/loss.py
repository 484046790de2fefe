"""The training loss: next-token cross-entropy over weighted targets, optionally in chunks of
positions, PaLM's z-loss, and an MoE model's router losses (models/moe.py). Pure functions of
(params, graph definition, batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models import context_parallel
from models.layers import dense

Batch = dict[str, jax.Array]


def loss_sums(
  params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, *, chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over real tokens, and the number of real tokens."""
  ce_sum, _, weight_sum = loss_terms(params, graphdef, batch, chunk=chunk)
  return ce_sum, weight_sum


def loss_terms(
  params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, *, chunk: int = 0, z: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(cross-entropy sum, sum of logsumexp², weight sum) over the batch's weighted targets
  (``forward_terms`` without the MoE statistics).

  ``chunk`` > 0: the output projection and the cross-entropy run over ``chunk`` positions at a
  time under ``jax.checkpoint``, so the fp32 [B, L, V] logits never exist whole (the backward
  pass recomputes each chunk's logits). Same values and gradients as ``chunk=0``. The
  logsumexp² sum (for the z-loss) is computed only with ``z``; it is zero otherwise.
  """
  return forward_terms(params, graphdef, batch, chunk=chunk, z=z)[:3]


def forward_terms(
  params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, *, chunk: int = 0, z: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
  """``loss_terms`` and the MoE routers' statistics, per layer, with ``router_loss``: their
  losses weighted by ``model.moe``'s coefficients and averaged over layers ({} when dense)."""
  model = nnx.merge(graphdef, params)
  # Rows split over a context axis: the whole batch in the striped layout, as the model runs
  # them; the sums over tokens below do not depend on the order (models/context_parallel.py).
  c = context_parallel.shards()
  if c > 1:
    batch = {key: context_parallel.to_striped(rows, c) for key, rows in batch.items()}
  weights_BL = batch["weights"].astype(jnp.float32)
  inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
  moe = model.cfg.moe
  if not chunk:
    logits_BLV, stats = model.logits_and_stats(*inputs, striped=True)
    ce_sum, lse2_sum = cross_entropy(logits_BLV, batch["targets"], weights_BL, z)
    return ce_sum, lse2_sum, jnp.sum(weights_BL), with_router_loss(stats, moe)
  h_BLD, stats = model.logits_and_stats(*inputs, features=True, striped=True)
  kernel_DV = model.output_kernel()
  b, length, d = h_BLD.shape

  def in_chunks(x):  # [B, L, ...] -> [L / chunk, B, chunk, ...]
    return jnp.swapaxes(x.reshape(b, length // chunk, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(h_BCD, targets_BC, weights_BC):
    logits_BCV = dense(h_BCD, kernel_DV, preferred_element_type=jnp.float32)
    return cross_entropy(logits_BCV, targets_BC, weights_BC, z)

  def body(carry, chunk_inputs):
    ce, lse2 = one(*chunk_inputs)
    return (carry[0] + ce, carry[1] + lse2), None

  zero = jnp.zeros((), jnp.float32)
  xs = (in_chunks(h_BLD), in_chunks(batch["targets"]), in_chunks(weights_BL))
  (ce_sum, lse2_sum), _ = jax.lax.scan(body, (zero, zero), xs)
  return ce_sum, lse2_sum, jnp.sum(weights_BL), with_router_loss(stats, moe)


def with_router_loss(stats: dict[str, jax.Array], moe) -> dict[str, jax.Array]:
  if not stats:
    return stats
  router = moe.balance_loss * jnp.mean(stats["balance_loss"])
  router = router + moe.router_z_loss * jnp.mean(stats["z_loss"])
  return {**stats, "router_loss": router}


def cross_entropy(logits_BLV, targets_BL, weights_BL, z: bool) -> tuple[jax.Array, jax.Array]:
  """Weighted sums of -log p(target) and (with ``z``) of logsumexp², the z-loss term."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  losses_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  lse2 = jnp.zeros((), jnp.float32)
  if z:
    lse2 = jnp.sum(jnp.square(jax.nn.logsumexp(logits_BLV, axis=-1)) * weights_BL)
  return jnp.sum(losses_BL * weights_BL), lse2


def objective(params, graphdef, batch: Batch, chunk: int, z_loss: float):
  """What the gradient is of: cross-entropy plus z_loss × logsumexp² (PaLM's z-loss), plus an
  MoE model's router losses per token (the sums are divided by the token count later).

  Returns (total, (loss sum, count, router statistics, metric sums)): the step divides the
  total's gradient, the loss sum and the metric sums by the count of the whole batch (tokens
  here, pairs for ``train/dpo.py``'s objective); the statistics are means over micro-batches."""
  ce_sum, lse2_sum, weight_sum, stats = forward_terms(
    params, graphdef, batch, chunk=chunk, z=z_loss > 0
  )
  total = ce_sum + z_loss * lse2_sum
  if stats:
    total = total + stats["router_loss"] * weight_sum
  return total, (ce_sum, weight_sum, stats, {})
