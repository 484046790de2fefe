"""Mixture of experts: a router picks ``experts_per_token`` of ``num_experts`` MLPs per token.

Shapes in names: T tokens (batch × length, merged), D model width, E experts, K experts per
token, F an expert's width, A = T·K assignments, C an expert's capacity.

Routers:

- ``softmax`` (Mixtral, Qwen3-MoE): probabilities over all experts, the top K kept, their weights
  renormalised to sum to 1 when ``norm_topk`` (Qwen3-MoE's ``norm_topk_prob``; Mixtral always).
- ``sigmoid`` (DeepSeek-V3): an independent score per expert; the top K of score + bias are
  chosen, where the bias (a ``RouterBias`` variable, never trained by gradients) is moved after
  each step toward equal load by ``balance_bias`` (auxiliary-loss-free balancing). The weights
  are the chosen scores, renormalised when ``norm_topk``.

Dispatch:

- ``dropless``: the assignments sorted by expert and every expert's rows multiplied at once by
  a grouped matmul (``jax.lax.ragged_dot``): no token is dropped and no padding is computed.
- ``capacity``: each expert takes at most C = ceil(capacity_factor · A / E) assignments, top-1
  choices first (GShard's priority); the rest are dropped (the token keeps its residual stream
  and its other experts) and counted. Fixed shapes [E, C, D]: batched matmuls on any backend.

Both return the same result when no assignment is dropped (tests/test_moe.py proves it against a
dense reference that runs every expert on every token). The router's statistics come back with
the output: the load-balancing loss (Switch/GShard: E · Σ_e f_e · P_e, 1 at perfect balance),
the router z-loss (mean logsumexp² of the router logits), each expert's share of the assignments
and the dropped fraction.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import ModelConfig, MoEConfig
from models.layers import MLP, out_proj_std
from models.params import make_param, normal
from models.sharding import partitioned


class RouterBias(nnx.Param):
  """The sigmoid router's selection bias: set by the train step with ``balance_bias``, never by
  gradients (it only chooses experts, so its gradient is zero). A Param so that it lives in the
  train state and its checkpoints like every weight."""


# --- routing -------------------------------------------------------------------------------------


def route(
  logits_TE: jax.Array, moe: MoEConfig, bias_E: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(weights [T, K] float32, experts [T, K] int32, probs [T, E] float32).

  ``probs`` are what the load-balancing loss weighs (softmax probabilities; for the sigmoid
  router, the scores normalised per token). ``bias_E`` shifts only the sigmoid router's choice.
  """
  logits_TE = logits_TE.astype(jnp.float32)
  k = moe.experts_per_token
  if moe.router == "softmax":
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    weights_TK, experts_TK = jax.lax.top_k(probs_TE, k)
  else:
    scores_TE = jax.nn.sigmoid(logits_TE)
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.astype(jnp.float32)
    _, experts_TK = jax.lax.top_k(jax.lax.stop_gradient(choice_TE), k)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
  if moe.norm_topk:
    weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
  return weights_TK, experts_TK.astype(jnp.int32), probs_TE


def expert_load(experts_TK: jax.Array, num_experts: int) -> jax.Array:
  """Each expert's share of the assignments, [E] summing to 1."""
  counts_E = jnp.bincount(experts_TK.reshape(-1), length=num_experts)
  return counts_E.astype(jnp.float32) / experts_TK.size


def balance_loss(probs_TE: jax.Array, experts_TK: jax.Array) -> jax.Array:
  """E · Σ_e f_e · P_e: f_e the share of assignments expert e received (no gradient), P_e its
  mean router probability. 1 when both are uniform; up to E when one expert takes everything."""
  num_experts = probs_TE.shape[-1]
  f_E = jax.lax.stop_gradient(expert_load(experts_TK, num_experts))
  return num_experts * jnp.sum(f_E * jnp.mean(probs_TE, axis=0))


def z_loss(logits_TE: jax.Array) -> jax.Array:
  """ST-MoE's router z-loss: the mean squared logsumexp of the router logits."""
  return jnp.mean(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1) ** 2)


def balance_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3's update: raise the bias of experts below the mean load by ``rate``, lower
  those above it (sign of the error, so the step is the same at any batch size)."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E).astype(bias_E.dtype)


def rebalance(params: Any, old_params: Any, load_LE: jax.Array, rate: float) -> Any:
  """``params`` (a model's pure dict) with every layer's router bias set to ``balance_bias`` of
  its value in ``old_params``, by that layer's load (``load_LE``, [num_layers, E])."""

  def walk(new, old, layer):
    if not isinstance(new, dict):
      return new
    out = {}
    for key, value in new.items():
      index = key if isinstance(key, int) else layer
      if key == "router_bias":
        load = load_LE if index is None else load_LE[index]  # scanned: [L, E]; unrolled: [E]
        out[key] = balance_bias(old[key], load, rate)
      else:
        out[key] = walk(value, old[key], index)
    return out

  return walk(params, old_params, None)


def metrics(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The train metrics of the routers' statistics (each stacked over layers): the losses'
  means, and per layer the largest and smallest expert share and the dropped fraction."""
  out = {
    "moe/balance_loss": jnp.mean(stats["balance_loss"]),
    "moe/z_loss": jnp.mean(stats["z_loss"]),
    "moe/router_loss": stats["router_loss"],
  }
  for i in range(stats["load"].shape[0]):
    out[f"moe/load_max/layer_{i}"] = jnp.max(stats["load"][i])
    out[f"moe/load_min/layer_{i}"] = jnp.min(stats["load"][i])
    out[f"moe/dropped/layer_{i}"] = stats["dropped"][i]
  return out


# --- dispatch ------------------------------------------------------------------------------------


def dropless(x_TD, weights_TK, experts_TK, kernels: dict[str, jax.Array], kind: str):
  """Σ_k weight · expert_k(x) per token: assignments sorted by expert, one grouped matmul per
  projection. Returns [T, D] in x's dtype."""
  t, k = experts_TK.shape
  num_experts = kernels["up"].shape[0]
  flat_A = experts_TK.reshape(-1)
  order_A = jnp.argsort(flat_A, stable=True)
  token_A = order_A // k
  sizes_E = jnp.bincount(flat_A, length=num_experts).astype(jnp.int32)
  xs_AD = x_TD[token_A]

  def grouped(h, kernel):
    return jax.lax.ragged_dot(h, kernel, sizes_E, preferred_element_type=jnp.float32).astype(
      x_TD.dtype
    )

  h_AF = _activate(grouped(xs_AD, kernels["up"]), kernels, kind, lambda w: grouped(xs_AD, w))
  ys_AD = grouped(h_AF, kernels["down"])
  w_A = weights_TK.reshape(-1)[order_A]
  y_TD = jnp.zeros((t, x_TD.shape[-1]), jnp.float32).at[token_A].add(ys_AD * w_A[:, None])
  return y_TD.astype(x_TD.dtype)


def with_capacity(x_TD, weights_TK, experts_TK, kernels: dict[str, jax.Array], kind: str, cap: int):
  """The same sum with at most ``cap`` assignments per expert (top-1 choices first); the rest
  dropped. Returns ([T, D] in x's dtype, the number of dropped assignments)."""
  t, k = experts_TK.shape
  num_experts, d = kernels["up"].shape[0], x_TD.shape[-1]
  # Priority order: every token's first choice, then every token's second, ...
  expert_A = experts_TK.T.reshape(-1)
  token_A = jnp.tile(jnp.arange(t), k)
  weight_A = weights_TK.T.reshape(-1)
  onehot_AE = jax.nn.one_hot(expert_A, num_experts, dtype=jnp.int32)
  position_A = jnp.take_along_axis(jnp.cumsum(onehot_AE, axis=0), expert_A[:, None], axis=1)[:, 0]
  position_A = position_A - 1
  kept_A = position_A < cap
  slot_A = jnp.where(kept_A, position_A, cap)  # out of range: dropped by the scatter
  x_ECD = (
    jnp.zeros((num_experts, cap, d), x_TD.dtype)
    .at[expert_A, slot_A]
    .set(x_TD[token_A], mode="drop")
  )

  def batched(h, kernel):
    return jnp.einsum("ecd,edf->ecf", h, kernel, preferred_element_type=jnp.float32).astype(
      x_TD.dtype
    )

  h_ECF = _activate(batched(x_ECD, kernels["up"]), kernels, kind, lambda w: batched(x_ECD, w))
  y_ECD = batched(h_ECF, kernels["down"])
  out_AD = y_ECD[expert_A, jnp.minimum(slot_A, cap - 1)]
  contribution_AD = out_AD.astype(jnp.float32) * jnp.where(kept_A, weight_A, 0.0)[:, None]
  y_TD = jnp.zeros((t, d), jnp.float32).at[token_A].add(contribution_AD)
  return y_TD.astype(x_TD.dtype), jnp.sum(~kept_A)


def _activate(up, kernels, kind: str, project):
  if kind == "swiglu":
    return jax.nn.silu(project(kernels["gate"])) * up
  return jax.nn.gelu(up, approximate=True)


# --- the layer -----------------------------------------------------------------------------------


class MoE(nnx.Module):
  """Routed experts (and optional shared ones) in place of the dense MLP; same activations.

  ``__call__(x [B, L, D])`` returns (y [B, L, D], stats): ``balance_loss``, ``z_loss`` (scalars
  to weigh into the training loss), ``load`` ([E] share of assignments) and ``dropped`` (the
  fraction of assignments dropped; 0 when dropless).
  """

  def __init__(self, cfg: ModelConfig, moe: MoEConfig, *, rngs: nnx.Rngs):
    moe.validate()
    self.moe = moe
    self.kind = cfg.mlp
    self.dtype = jnp.dtype(cfg.dtype)
    e, d, f = moe.num_experts, cfg.d_model, moe.expert_dim
    init = normal(cfg.init_std)
    self.router_kernel = make_param(rngs, init, (d, e), ("embed", None), cfg)
    zeros = partitioned(nnx.initializers.zeros, ("expert",))
    self.router_bias = (  # float32 whatever param_dtype: its steps are small
      RouterBias(zeros(rngs.params(), (e,), jnp.float32)) if moe.router == "sigmoid" else None
    )
    self.up_kernel = make_param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), cfg)
    self.gate_kernel = (
      make_param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), cfg)
      if cfg.mlp == "swiglu"
      else None
    )
    down_names = ("expert", "mlp", "embed")
    self.down_kernel = make_param(rngs, normal(out_proj_std(cfg)), (e, f, d), down_names, cfg)
    if moe.shared_experts:
      shared = dataclasses.replace(cfg, mlp_dim=moe.shared_experts * f)
      self.shared = MLP(shared, rngs=rngs)
    else:
      self.shared = None

  def kernels(self) -> dict[str, jax.Array]:
    kernels = {"up": self.up_kernel[...], "down": self.down_kernel[...]}
    if self.gate_kernel is not None:
      kernels["gate"] = self.gate_kernel[...]
    return {name: kernel.astype(self.dtype) for name, kernel in kernels.items()}

  def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    b, length, d = x_BLD.shape
    x_TD = x_BLD.reshape(b * length, d)
    logits_TE = jnp.dot(
      x_TD.astype(jnp.float32), self.router_kernel[...].astype(jnp.float32)
    )  # the router in float32: its choices are discrete and its softmax sensitive
    bias_E = None if self.router_bias is None else self.router_bias[...]
    weights_TK, experts_TK, probs_TE = route(logits_TE, self.moe, bias_E)
    if self.moe.dispatch == "dropless":
      y_TD = dropless(x_TD, weights_TK, experts_TK, self.kernels(), self.kind)
      dropped = jnp.zeros((), jnp.float32)
    else:
      cap = self.moe.capacity(b * length)
      y_TD, count = with_capacity(x_TD, weights_TK, experts_TK, self.kernels(), self.kind, cap)
      dropped = count.astype(jnp.float32) / experts_TK.size
    y_BLD = y_TD.reshape(b, length, d)
    if self.shared is not None:
      y_BLD = y_BLD + self.shared(x_BLD)
    stats = {
      "balance_loss": balance_loss(probs_TE, experts_TK),
      "z_loss": z_loss(logits_TE),
      "load": expert_load(experts_TK, self.moe.num_experts),
      "dropped": dropped,
    }
    return y_BLD, stats
