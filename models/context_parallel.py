"""Context parallelism: each row's length split over the mesh axes the "length" rule names.

Layout (striped, for load balance under the causal mask): token t of a row lives on shard
t % C at local slot t // C, C being the number of shards. A contiguous split would give the
last shard a full triangle of causal work and the first almost none; striped, every shard holds
queries from the whole row and does about the same work. ``to_striped`` permutes a row into
that order once at the model's input (tokens, true positions and segment ids together, so RoPE
and the learned positions see each token's true position), a contiguous split of the permuted
row is then the striped layout, and ``from_striped`` restores the order of the final hidden
states (one all-to-all of [B, L, D] each way), so callers (DPO, GRPO, scoring) see rows in
their own order. The language-model loss (train/loss.py), a sum over tokens, instead permutes
its whole batch (targets and weights too) and keeps the model's output striped: no all-to-all
of hidden states at all. Everything between (norms, MLPs, projections) works on length shards by the
sharding constraints; only attention needs keys from other shards, in one of two forms
(``model.attention_context``):

- ``all_gather``: inside ``jax.shard_map``, each shard all-gathers the row's keys and values
  (with their segment ids) over the context axes and attends its local queries to all of them:
  per device the scores are [L / C, L] rather than [L, L]; with ``model.attention_block`` = b
  dividing L / C, by blocks of b local queries, each block's scores recomputed in the backward
  pass: [b, L] of them at a time (what makes a 131k-token row fit, docs/long_context.md).
- ``ring``: keys and values (with segment ids and row indices) pass round the context axes by
  ``jax.lax.ppermute`` in C steps; each step folds one [L / C, L / C] block into an online
  softmax (running max and sum, float32 accumulators). The forward pass holds one block of
  scores at a time; the backward pass keeps each step's, as the all-gather form keeps its.

Both mask by each token's index in the original row and by segment id, exactly the reference's
``causal_segment_mask``, so they are exact up to float summation order. Where splash runs
(TPUs), the all-gather form runs it per shard instead of this module's math
(models/attention.py: ``context_kernel``, ``splash_attention``); the ring form, and GPUs
(cuDNN's masks cannot describe a striped shard's), use the math here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.sharding import active_axes, attention_specs

FORMS = ("all_gather", "ring")


def context_axes() -> tuple[tuple[str, ...], int]:
  """The mesh axes that split an activation's "length" (its row axis) under the active mesh and
  rules, and their total size: ((), 1) without a mesh, or when nothing splits the length."""
  return active_axes(("batch", "length"), 1)


def shards() -> int:
  """C: how many shards each row's length is split into (1: no context parallelism)."""
  return context_axes()[1]


def to_striped(x_BL: jax.Array, c: int) -> jax.Array:
  """Row order -> striped order: position r·(L/C) + j holds the row's token j·C + r."""
  b, length = x_BL.shape[:2]
  rest = x_BL.shape[2:]
  return jnp.swapaxes(x_BL.reshape(b, length // c, c, *rest), 1, 2).reshape(x_BL.shape)


def from_striped(x_BL: jax.Array, c: int) -> jax.Array:
  """The inverse of ``to_striped``."""
  b, length = x_BL.shape[:2]
  rest = x_BL.shape[2:]
  return jnp.swapaxes(x_BL.reshape(b, c, length // c, *rest), 1, 2).reshape(x_BL.shape)


def _row_index(local: int, c: int, shard: jax.Array) -> jax.Array:
  """int32[local]: the original row index of each local slot of striped shard ``shard``."""
  return jnp.arange(local, dtype=jnp.int32) * c + shard.astype(jnp.int32)


def _mask(q_idx_L, k_idx_S, q_ids_BL, k_ids_BS) -> jax.Array:
  """bool[B or 1, L, S]: key index <= query index in the row, and the same segment."""
  causal_LS = k_idx_S[None, :] <= q_idx_L[:, None]
  if q_ids_BL is None:
    return causal_LS[None]
  return causal_LS[None] & (q_ids_BL[:, :, None] == k_ids_BS[:, None, :])


def _scores(q_BLKGH, k_BSKH, mask_BLS) -> jax.Array:
  """Masked float32 scores [B, K, G, L, S] (q already scaled)."""
  logits = jnp.einsum("BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH, preferred_element_type=jnp.float32)
  return jnp.where(mask_BLS[:, None, None], logits, jnp.finfo(jnp.float32).min)


def _gathered(q_BLKGH, k_BSKH, v_BSKH, ids_BL, axes, c: int, block: int = 0) -> jax.Array:
  """One shard's all-gather attention: its queries over the whole row's keys; by blocks of
  ``block`` local queries when that divides them (``model.attention_block``), each block's
  scores recomputed in the backward pass, so that no more than [block, L] of them exist."""
  b, local = q_BLKGH.shape[:2]
  k_all = jax.lax.all_gather(k_BSKH, axes, axis=1, tiled=True)
  v_all = jax.lax.all_gather(v_BSKH, axes, axis=1, tiled=True)
  # Gathered shard-major: slot s·(L/C) + j holds row index j·C + s.
  k_idx = (jnp.arange(local, dtype=jnp.int32)[None, :] * c + jnp.arange(c)[:, None]).reshape(-1)
  q_idx = _row_index(local, c, jax.lax.axis_index(axes))
  ids_all = None if ids_BL is None else jax.lax.all_gather(ids_BL, axes, axis=1, tiled=True)

  def attend(q_BLKGH, q_idx_L, ids_BL):
    probs = jax.nn.softmax(_scores(q_BLKGH, k_all, _mask(q_idx_L, k_idx, ids_BL, ids_all)), -1)
    return jnp.einsum("BKGLS,BSKH->BLKGH", probs.astype(v_all.dtype), v_all)

  if not block or local <= block or local % block:
    return attend(q_BLKGH, q_idx, ids_BL)
  n = local // block

  def blocks(x):  # [B, L, ...] -> [L / block, B, block, ...]
    return jnp.swapaxes(x.reshape(b, n, block, *x.shape[2:]), 0, 1)

  ids = jnp.zeros((b, local), jnp.int32) if ids_BL is None else ids_BL
  body = jax.checkpoint(
    lambda _, x: (None, attend(x[0], x[1], None if ids_BL is None else x[2])),
    prevent_cse=False,
  )
  _, out = jax.lax.scan(body, None, (blocks(q_BLKGH), q_idx.reshape(n, block), blocks(ids)))
  return jnp.swapaxes(out, 0, 1).reshape(q_BLKGH.shape)


def _fold(carry, q_BLKGH, k_BSKH, v_BSKH, q_idx, k_idx, q_ids, k_ids):
  """One ring step: the online softmax of ``carry`` (running max, sum, weighted values) extended
  by one block of keys. (Rematerialising it, so that the backward pass keeps no step's scores,
  raised XLA:CPU's compiled temporaries at context 2 (+37%, 1024-token row): not done.)"""
  m, total, acc = carry
  mask = _mask(q_idx, k_idx, q_ids, k_ids)
  scores = _scores(q_BLKGH, k_BSKH, mask)
  m_new = jnp.maximum(m, scores.max(axis=-1))
  p = jnp.where(mask[:, None, None], jnp.exp(scores - m_new[..., None]), 0.0)
  rescale = jnp.exp(m - m_new)
  pv = jnp.einsum("BKGLS,BSKH->BKGLH", p.astype(v_BSKH.dtype), v_BSKH)
  return m_new, total * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv.astype(jnp.float32)


def _ring(q_BLKGH, k_BSKH, v_BSKH, ids_BL, axes, c: int) -> jax.Array:
  """One shard's ring attention: C steps, each over the key block in hand, then passed on."""
  b, local, kv, g, h = q_BLKGH.shape
  q_idx = _row_index(local, c, jax.lax.axis_index(axes))
  neighbour = [(i, (i + 1) % c) for i in range(c)]
  carry = (
    jnp.full((b, kv, g, local), jnp.finfo(jnp.float32).min, jnp.float32),  # running max
    jnp.zeros((b, kv, g, local), jnp.float32),  # running sum of exp(score - max)
    jnp.zeros((b, kv, g, local, h), jnp.float32),  # running sum of exp(score - max) · v
  )
  block = (k_BSKH, v_BSKH, q_idx, ids_BL)  # keys, values, their row indices and segment ids
  for step in range(c):
    k, v, k_idx, k_ids = block
    carry = _fold(carry, q_BLKGH, k, v, q_idx, k_idx, ids_BL, k_ids)
    if step < c - 1:
      block = tuple(None if x is None else jax.lax.ppermute(x, axes, neighbour) for x in block)
  _, total, acc = carry
  out_BKGLH = acc / total[..., None]  # every query sees at least itself: total > 0
  return jnp.transpose(out_BKGLH, (0, 3, 1, 2, 4)).astype(q_BLKGH.dtype)


def attention(
  q_BLNH: jax.Array,
  k_BLKH: jax.Array,
  v_BLKH: jax.Array,
  segment_ids_BL: jax.Array | None,
  scale: float,
  form: str,
  block: int = 0,
) -> jax.Array:
  """Causal (packed) self-attention of rows in the striped layout, split over the context axes.

  q, k and v are the whole (global) arrays with their length in striped order (``to_striped``);
  the result [B, L, N, H] is in that order too. Rows are split over the batch axes, heads over
  the head axes (key/value heads repeated per query head when only the query heads are split),
  and the length over the context axes, by shard_map.
  """
  if form not in FORMS:
    raise ValueError(f"model.attention_context={form!r} is not one of {FORMS}")
  axes, c = context_axes()
  k_BLKH, v_BLKH, q_spec, kv_spec, ids_spec = attention_specs(
    q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, "length"
  )
  local_form = functools.partial(_gathered, block=block) if form == "all_gather" else _ring

  def attend(q_BLNH, k_BLKH, v_BLKH, ids_BL):
    b, length, heads, h = q_BLNH.shape
    groups = k_BLKH.shape[2]
    q = (q_BLNH * jnp.asarray(scale, q_BLNH.dtype)).reshape(b, length, groups, heads // groups, h)
    out_BLKGH = local_form(q, k_BLKH, v_BLKH, ids_BL, axes, c)
    return out_BLKGH.reshape(b, length, heads, h)

  return jax.shard_map(
    attend, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec, check_vma=False
  )(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL)
