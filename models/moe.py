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

Experts over the mesh: when the rule table splits the experts' axis over mesh axes (the
``expert`` mesh axis), ``exchange`` runs the dispatch inside ``shard_map``: each device sorts its
own tokens' assignments by the device that holds their expert, sends them there with one
``jax.lax.all_to_all``, multiplies what it received by its local experts (grouped matmul), and
sends the results back with a second all-to-all. The buffers are fixed-shape: per peer, room for
every local assignment when dropless (nothing can drop; memory ``expert``× the assignments), or
``capacity_factor`` × the even share in capacity mode (overflow dropped, first choices first, and
counted). Without an expert axis the experts' kernels shard like a dense MLP's (their embed axis
over fsdp) and the dispatch above runs under the compiler's partitioning.

``auto`` picks per backend when traced (``resolve_dispatch``): ``dropless`` on TPUs and GPUs,
where the grouped matmul is one kernel; ``capacity`` on CPUs, where XLA computes a grouped matmul
as every group over all rows (measured on a 2-core EPYC, 8 experts, top-2: dropless 6× slower).

Both return the same result when no assignment is dropped (tests/test_moe.py proves it against a
dense reference that runs every expert on every token). The router's statistics come back with
the output: the load-balancing loss (Switch/GShard: E · Σ_e f_e · P_e, 1 at perfect balance),
the router z-loss (mean logsumexp² of the router logits), each expert's share of the assignments
and the dropped fraction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models import attention, sharding
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
  mean router probability. 1 when both are uniform; at most E / K with K experts a token (each
  token's K picks are distinct, so no expert gets more than 1 / K of the assignments)."""
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


def rebalance(
  params: Any, old_params: Any, load_LE: jax.Array, rate: float, first_dense: int = 0
) -> Any:
  """``params`` (a model's pure dict) with every layer's router bias set to ``balance_bias`` of
  its value in ``old_params``, by that layer's load (``load_LE``, [MoE layers, E]; the MoE
  layers follow ``first_dense`` dense ones)."""

  def walk(new, old, layer):
    if not isinstance(new, dict):
      return new
    out = {}
    for key, value in new.items():
      index = key if isinstance(key, int) else layer
      if key == "router_bias":  # scanned: [L, E] (the MoE stack); unrolled: [E] of layer index
        load = load_LE if index is None else load_LE[index - first_dense]
        out[key] = balance_bias(old[key], load, rate)
      else:
        out[key] = walk(value, old[key], index)
    return out

  return walk(params, old_params, None)


def metrics(stats: dict[str, jax.Array], first_dense: int = 0) -> dict[str, jax.Array]:
  """The train metrics of the routers' statistics (each stacked over the MoE layers, which
  follow ``first_dense`` dense ones): the losses' means, and per layer (named by its index in
  the model) the largest and smallest expert share and the dropped fraction."""
  out = {
    "moe/balance_loss": jnp.mean(stats["balance_loss"]),
    "moe/z_loss": jnp.mean(stats["z_loss"]),
    "moe/router_loss": stats["router_loss"],
  }
  for i in range(stats["load"].shape[0]):
    layer = i + first_dense
    out[f"moe/load_max/layer_{layer}"] = jnp.max(stats["load"][i])
    out[f"moe/load_min/layer_{layer}"] = jnp.min(stats["load"][i])
    out[f"moe/dropped/layer_{layer}"] = stats["dropped"][i]
  return out


# --- dispatch ------------------------------------------------------------------------------------


def resolve_dispatch(dispatch: str, platform: str | None = None) -> str:
  """``model.moe.dispatch`` for ``platform`` (default: the platform the program being traced
  is for, ``models.attention.platform``: an ahead-of-time TPU plan traced on a CPU host is for
  the TPU): ``auto`` is ``capacity`` on CPUs and ``dropless`` elsewhere; the others are
  themselves."""
  if dispatch != "auto":
    return dispatch
  platform = attention.platform() if platform is None else platform
  return "capacity" if platform == "cpu" else "dropless"


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


KERNEL_NAMES = {
  "up": ("expert", "embed", "mlp"),
  "gate": ("expert", "embed", "mlp"),
  "down": ("expert", "mlp", "embed"),
}


def _axes(entry) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def expert_axes(batch: int) -> tuple[str, ...]:
  """The mesh axes the experts are split over, when ``exchange`` applies: a mesh and rules are
  active, the experts' axis is split more than one way, and a batch of ``batch`` rows splits
  evenly over the batch's mesh axes (else, as for a single decoded sequence, ``()``: the
  dispatch runs unsplit)."""
  if not sharding.is_active():
    return ()
  mesh = jax.sharding.get_abstract_mesh()
  axes = _axes(sharding.active_spec(("expert",))[0])
  if math.prod(mesh.shape[a] for a in axes) <= 1:
    return ()
  batch_axes = _axes(sharding.active_spec(("batch",))[0])
  missing = [a for a in axes if a not in batch_axes]
  if missing:
    raise ValueError(
      f"the experts are split over the mesh axes {axes} but the batch is not split over "
      f"{missing} (mesh.rules maps batch to {batch_axes}); add them to the batch rule so that "
      f"each expert shard holds different tokens"
    )
  if batch % math.prod(mesh.shape[a] for a in batch_axes):
    return ()
  return axes


def exchange(
  x_TD, weights_TK, experts_TK, kernels: dict[str, jax.Array], kind: str, cap: int | None
) -> tuple[jax.Array, jax.Array]:
  """The dispatch with the experts split over the mesh (``expert_axes``): tokens go to their
  experts' devices and back by all-to-all. ``cap``: assignments one device may send one peer
  (None: all of its own, so none drops). Returns ([T, D] in x's dtype, dropped count)."""
  mesh = jax.sharding.get_abstract_mesh()
  specs = {name: sharding.active_spec(KERNEL_NAMES[name]) for name in kernels}
  ex_axes = _axes(specs["up"][0])
  peers = math.prod(mesh.shape[a] for a in ex_axes)
  mlp_axes = _axes(specs["up"][2])
  if _axes(specs["down"][1]) != mlp_axes:
    raise ValueError(f"the experts' mlp axis is split unlike its up projection: {specs}")
  batch_axes = _axes(sharding.active_spec(("batch",))[0])
  rows = jax.sharding.PartitionSpec(batch_axes, None)

  def local(x, weights, experts, shards):
    full = {}  # each local expert's whole embed axis (an FSDP gather; its transpose scatters)
    for name, shard in shards.items():
      dim = 2 if name == "down" else 1
      gather = _axes(specs[name][dim])
      full[name] = jax.lax.all_gather(shard, gather, axis=dim, tiled=True) if gather else shard
    t, k = experts.shape
    d = x.shape[-1]
    local_experts = shards["up"].shape[0]
    a = t * k
    room = a if cap is None else min(cap, a)
    # Choice-major, so a peer's overflow drops second choices before first ones.
    expert_A = experts.T.reshape(-1)
    token_A = jnp.tile(jnp.arange(t), k)
    weight_A = weights.T.reshape(-1)
    peer_A = expert_A // local_experts
    order_A = jnp.argsort(peer_A, stable=True)
    peer_A, expert_A = peer_A[order_A], expert_A[order_A]
    token_A, weight_A = token_A[order_A], weight_A[order_A]
    counts_P = jnp.bincount(peer_A, length=peers)
    position_A = jnp.arange(a) - (jnp.cumsum(counts_P) - counts_P)[peer_A]
    kept_A = position_A < room
    slot_A = jnp.where(kept_A, position_A, room)  # out of range: dropped by the scatters
    send_x = jnp.zeros((peers, room, d), x.dtype).at[peer_A, slot_A].set(x[token_A], mode="drop")
    send_e = (
      jnp.full((peers, room), local_experts, jnp.int32)  # local_experts marks an empty slot
      .at[peer_A, slot_A]
      .set(expert_A % local_experts, mode="drop")
    )
    got_x = jax.lax.all_to_all(send_x, ex_axes, 0, 0, tiled=True).reshape(peers * room, d)
    got_e = jax.lax.all_to_all(send_e, ex_axes, 0, 0, tiled=True).reshape(peers * room)
    order_R = jnp.argsort(got_e, stable=True)
    sizes_E = jnp.bincount(got_e, length=local_experts + 1)[:local_experts].astype(jnp.int32)
    xs_R = got_x[order_R]

    def grouped(h, kernel):
      out = jax.lax.ragged_dot(h, kernel, sizes_E, preferred_element_type=jnp.float32)
      return out.astype(x.dtype)

    h_R = _activate(grouped(xs_R, full["up"]), full, kind, lambda w: grouped(xs_R, w))
    ys_R = grouped(h_R, full["down"])
    filled_R = jnp.arange(peers * room) < jnp.sum(sizes_E)  # the empty slots sorted last
    ys_R = jnp.where(filled_R[:, None], ys_R, 0)
    back = jnp.zeros_like(ys_R).at[order_R].set(ys_R).reshape(peers, room, d)
    back = jax.lax.all_to_all(back, ex_axes, 0, 0, tiled=True)
    out_AD = back[peer_A, jnp.minimum(slot_A, room - 1)].astype(jnp.float32)
    out_AD = jnp.where(kept_A[:, None], out_AD * weight_A[:, None], 0.0)
    y = jnp.zeros((t, d), jnp.float32).at[token_A].add(out_AD)
    if mlp_axes:  # each device computed its slice of the experts' width: sum the slices
      y = jax.lax.psum(y, mlp_axes)
    return y.astype(x.dtype), jnp.sum(~kept_A).reshape(1)

  y_TD, dropped = jax.shard_map(
    local,
    in_specs=(rows, rows, rows, specs),
    out_specs=(rows, jax.sharding.PartitionSpec(batch_axes)),
  )(x_TD, weights_TK, experts_TK, kernels)
  return y_TD, jnp.sum(dropped)


def _activate(up, kernels, kind: str, project):
  """The experts' hidden rows from their input projections, which are named "mlp" as the dense
  MLP's are (models/layers.py): ``model.remat=save_mlp`` keeps them too. (``save_dots`` does
  not: a grouped matmul is no dot_general, and the capacity einsum has a batch dimension.)"""
  up = checkpoint_name(up, "mlp")
  if kind == "swiglu":
    return jax.nn.silu(checkpoint_name(project(kernels["gate"]), "mlp")) * up
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
    dispatch = resolve_dispatch(self.moe.dispatch)
    split_over = expert_axes(b)
    if split_over:
      cap = None
      if dispatch == "capacity":  # capacity_factor × the even share per peer
        mesh_shape = jax.sharding.get_abstract_mesh().shape
        peers = math.prod(mesh_shape[a] for a in split_over)
        shards = math.prod(mesh_shape[a] for a in _axes(sharding.active_spec(("batch",))[0]))
        share = b * length // shards * self.moe.experts_per_token / peers
        cap = max(1, math.ceil(self.moe.capacity_factor * share))
      y_TD, count = exchange(x_TD, weights_TK, experts_TK, self.kernels(), self.kind, cap)
      dropped = count.astype(jnp.float32) / experts_TK.size
    elif dispatch == "dropless":
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
