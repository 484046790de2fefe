"""The decoder-only transformer: pre-norm blocks, scanned or unrolled, with a KV-cache decode path.

Born-sharded creation (the pattern the trainer uses; models/ itself never names a mesh axis)::

  rules = tuple(config.mesh.rules)          # (("batch", ("data", "fsdp")), ("embed", "fsdp"), ...)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)   # logical names -> NamedSharding
    state = jax.jit(
        lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))[1], out_shardings=shardings
    )()

  # later, inside the jitted pure step (still under set_mesh and the rules, so activation
  # constraints apply):  logits = nnx.merge(graphdef, state)(tokens, positions, segment_ids)

``state`` never exists unsharded: every parameter is created on its shards by the jitted init.
With a mesh and rules active, each parameter is also constrained as it is created (flax's eager
sharding), so the jitted init alone already yields equivalent shardings; ``out_shardings`` makes
them explicit and exact. Parameters of scanned layers have a leading "layers" axis. The optimizer
state built from ``state`` inherits these shardings. Without a mesh and rules (tests, one device)
the model is created and run unsharded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import context_parallel, pipeline
from models.attention import (
  Attention,
  KVCache,
  causal_segment_mask,
  decode_mask,
  implementation,
)
from models.config import ModelConfig
from models.layers import MLP, Embed, Norm, dense
from models.moe import MoE
from models.params import make_param, normal
from models.sharding import constrain

# Logical axes of init_cache()'s arrays, for the trainer's shardings of a generation loop.
# Its slots are not split over the context axis (the "length" rule is for activations).
CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")

_REMAT_POLICIES = {
  "full": None,  # save nothing: recompute the whole block in the backward pass
  # Save the outputs of matmuls with weights, recompute the rest. Attention's score matmuls
  # have batch dims and are L^2 in size, so they are recomputed rather than stored.
  "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  # Save named values: "attention", the attention kernel's output (models/attention.py), and
  # "mlp", the MLP's input projections (models/layers.py); the backward pass does not run the
  # attention kernel, or those matmuls, again.
  "save_attention": jax.checkpoint_policies.save_only_these_names("attention"),
  "save_mlp": jax.checkpoint_policies.save_only_these_names("mlp"),
  "save_attention_mlp": jax.checkpoint_policies.save_only_these_names("attention", "mlp"),
}


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is a mixture
  of experts (models/moe.py) when ``cfg.moe`` is set, unless ``dense`` (the first layers')."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dense: bool = False):
    norm_args = dict(kind=cfg.norm, use_bias=cfg.use_bias, rngs=rngs)
    self.attn_norm = Norm(cfg, cfg.d_model, ("embed",), **norm_args)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = Norm(cfg, cfg.d_model, ("embed",), **norm_args)
    sparse = cfg.moe is not None and not dense
    self.mlp = MoE(cfg, cfg.moe, rngs=rngs) if sparse else MLP(cfg, rngs=rngs)

  def __call__(
    self,
    x_BLD: jax.Array,
    positions_BL: jax.Array,
    mask_BLS: jax.Array | None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int | None = None,
    segment_ids_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None, dict[str, jax.Array]]:
    """(x, the updated cache, the MoE router's statistics: {} for a dense MLP)."""
    h_BLD, cache = self.attn(
      self.attn_norm(x_BLD), positions_BL, mask_BLS, cache, cache_index, segment_ids_BL
    )
    x_BLD = x_BLD + h_BLD
    h_BLD, stats = self.mlp(self.mlp_norm(x_BLD)), {}
    if isinstance(self.mlp, MoE):
      h_BLD, stats = h_BLD
    x_BLD = x_BLD + h_BLD
    return constrain(x_BLD, ("batch", "length", "embed")), cache, stats


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, count: int, dense: bool = False) -> Block:
  """``count`` blocks whose parameters are stacked on a leading "layers" axis."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs: nnx.Rngs) -> Block:
    return Block(cfg, rngs=rngs, dense=dense)

  return create(rngs)


def first_dense(cfg: ModelConfig) -> int:
  """How many of the first layers keep the dense MLP (an MoE model's ``model.moe.first_dense``)."""
  return 0 if cfg.moe is None else cfg.moe.first_dense


class Transformer(nnx.Module):
  """Decoder-only transformer language model configured by a ModelConfig (see module docstring)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, cfg.vocab_size, ("vocab", "embed"), rngs=rngs)
    self.pos_embed = (
      Embed(cfg, cfg.max_seq_len, ("positions", "embed"), rngs=rngs)
      if cfg.positions == "learned"
      else None
    )
    # An MoE model's first dense layers, scanned, are a stack of their own ("dense_blocks"):
    # one scan body per kind of block. Unrolled, they are the first entries of "blocks".
    k = first_dense(cfg)
    self.dense_blocks = _stacked_blocks(cfg, rngs, k, dense=True) if cfg.scan_layers and k else None
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs, cfg.num_layers - k)
    else:
      blocks = [Block(cfg, rngs=rngs, dense=i < k) for i in range(cfg.num_layers)]
      self.blocks = nnx.List(blocks)
    self.final_norm = Norm(
      cfg, cfg.d_model, ("embed",), kind=cfg.norm, use_bias=cfg.use_bias, rngs=rngs
    )
    self.unembed = (
      None
      if cfg.tie_embeddings
      else make_param(
        rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg
      )
    )

  def __call__(
    self,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array | None = None,
  ) -> jax.Array:
    """Float32 logits [B, L, V] of the next token at every position.

    positions_BL: each token's position within its segment (RoPE angle / learned-table row).
    segment_ids_BL: packing ids; a token attends to earlier-or-same positions of its own segment.
    None means one segment per row.
    """
    return self._logits(self._hidden(tokens_BL, positions_BL, segment_ids_BL)[0])

  def logits_and_stats(
    self,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array | None = None,
    *,
    features: bool = False,
    striped: bool = False,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``__call__`` (or ``features`` when ``features``) and the MoE routers' statistics, each
    stacked over layers ([num_layers] scalars, [num_layers, E] loads); {} for a dense model.

    ``striped``: with the rows split over a context axis, the inputs are already in the striped
    layout (``models.context_parallel.to_striped``) and the outputs stay in it: for a loss that
    is a sum over tokens, whose targets and weights the caller permutes alike, this saves the
    all-to-all that puts the hidden states back in row order. Without a split it changes nothing.
    """
    x_BLD, stats = self._hidden(tokens_BL, positions_BL, segment_ids_BL, striped)
    return (self.final_norm(x_BLD) if features else self._logits(x_BLD)), stats

  def features(
    self,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array | None = None,
  ) -> jax.Array:
    """The final-normed hidden states [B, L, D]: logits are ``features · output_kernel()``.

    For a loss computed in chunks of positions, so that [B, L, V] logits never exist whole.
    """
    return self.final_norm(self._hidden(tokens_BL, positions_BL, segment_ids_BL)[0])

  def output_kernel(self) -> jax.Array:
    """The output projection [D, V] in the compute dtype (the embedding's transpose if tied)."""
    if self.unembed is None:
      return self.embed.table[...].astype(self.embed.dtype).T
    return self.unembed[...].astype(jnp.dtype(self.cfg.dtype))

  def _hidden(
    self, tokens_BL, positions_BL, segment_ids_BL, striped: bool = False
  ) -> tuple[jax.Array, dict]:
    length = tokens_BL.shape[1]
    # A row split over a context axis runs in the striped layout (models/context_parallel.py):
    # tokens, true positions and segment ids permuted together here, the hidden states put
    # back in row order at the end (unless the caller gives and takes them ``striped``). Its
    # attention builds its own masks per shard.
    c = context_parallel.shards()
    permute = c > 1 and not striped
    if c > 1 and length % c:
      raise ValueError(
        f"data.seq_len={length} is not divisible by the {c} context shards (mesh.context)"
      )
    if permute:
      tokens_BL, positions_BL = (
        context_parallel.to_striped(x, c) for x in (tokens_BL, positions_BL)
      )
      if segment_ids_BL is not None:
        segment_ids_BL = context_parallel.to_striped(segment_ids_BL, c)
    # The einsum reference takes one [B, L, L] mask, built once for all layers; the kernels take
    # the segment ids themselves and never see a mask.
    kernel = implementation(self.cfg.attention, self.cfg.dtype, length, head_dim=self.cfg.head_dim)
    xla = kernel == "xla" and c == 1
    mask_BLL = causal_segment_mask(segment_ids_BL, length) if xla else None
    x_BLD = self._embed(tokens_BL, positions_BL)
    x_BLD, _, stats = self._run_blocks(
      x_BLD, positions_BL, mask_BLL, None, None, self.cfg.remat, segment_ids_BL
    )
    if permute:
      x_BLD = constrain(context_parallel.from_striped(x_BLD, c), ("batch", "length", "embed"))
    return x_BLD, stats

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict[str, jax.Array]:
    """An empty KV cache {"k", "v"}: [num_layers, batch, max_len, K, H] each (axes CACHE_AXES).

    dtype defaults to the compute dtype. Treat the cache as an opaque pytree: pass it to decode().
    """
    cfg = self.cfg
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}

  def decode(
    self,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    cache: dict[str, jax.Array],
    cache_index: jax.Array | int,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs L new tokens (a prefill when L > 1, one step when L == 1) against the cache.

    The tokens are written at cache slots cache_index .. cache_index + L - 1 (the same slots for
    every row) and attend to all slots up to their own. positions_BL give their positions (usually
    cache_index + arange(L)). Returns float32 logits [B, L, V] and the updated cache; the next
    call uses cache_index + L. One segment per row: packing is a training-time concern.
    """
    mask_1LS = decode_mask(cache_index, tokens_BL.shape[1], cache["k"].shape[2])
    x_BLD = self._embed(tokens_BL, positions_BL)
    x_BLD, cache, _ = self._run_blocks(x_BLD, positions_BL, mask_1LS, cache, cache_index, "none")
    return self._logits(x_BLD), cache

  def _embed(self, tokens_BL: jax.Array, positions_BL: jax.Array) -> jax.Array:
    x_BLD = self.embed(tokens_BL)
    if self.pos_embed is not None:
      x_BLD = x_BLD + self.pos_embed(positions_BL)
    return constrain(x_BLD, ("batch", "length", "embed"))

  def _logits(self, x_BLD: jax.Array) -> jax.Array:
    x_BLD = self.final_norm(x_BLD)
    if self.unembed is None:
      logits_BLV = self.embed.attend(x_BLD)
    else:
      kernel_DV = self.unembed[...].astype(x_BLD.dtype)
      logits_BLV = dense(x_BLD, kernel_DV, preferred_element_type=jnp.float32)
    return constrain(logits_BLV, ("batch", "length", "vocab"))

  def _pipelined(self, x_BLD, positions_BL, mask_BLS, remat: str, segment_ids_BL) -> jax.Array:
    """The training forward pass with the layers split over stages (models/pipeline.py); an MoE
    model's dense first layers and statistics are refused there (train/config.py)."""
    graphdef, stacked = nnx.split(self.blocks)

    def layer(state: nnx.State, x_BLD: jax.Array, inputs: dict) -> jax.Array:
      block = nnx.merge(graphdef, state)
      args = inputs["positions"], inputs.get("mask"), None, None, inputs.get("segment_ids")
      return block(x_BLD, *args)[0]

    rows = {"positions": positions_BL, "segment_ids": segment_ids_BL, "mask": mask_BLS}
    batch = x_BLD.shape[0]
    per_row = {k: v for k, v in rows.items() if v is not None and v.shape[0] == batch}
    shared = {k: v for k, v in rows.items() if v is not None and k not in per_row}
    return pipeline.run(
      _maybe_remat(layer, remat, prevent_cse=False),
      stacked,
      x_BLD,
      per_row,
      shared,
      microbatches=self.cfg.pipeline_microbatches,
      repeats=self.cfg.pipeline_repeats,
    )

  def _run_blocks(
    self,
    x_BLD: jax.Array,
    positions_BL: jax.Array,
    mask_BLS: jax.Array | None,
    cache: dict[str, jax.Array] | None,
    cache_index: jax.Array | int | None,
    remat: str,
    segment_ids_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None, dict[str, jax.Array]]:
    """Applies the blocks as pure functions of their split state (scan or python loop); returns
    (x, the cache, the MoE blocks' statistics stacked over those layers)."""

    def block_fn(graphdef: nnx.GraphDef, prevent_cse: bool) -> Callable:
      def apply(state: nnx.State, x_BLD: jax.Array, layer_cache: KVCache | None):
        block = nnx.merge(graphdef, state)
        return block(x_BLD, positions_BL, mask_BLS, layer_cache, cache_index, segment_ids_BL)

      return _maybe_remat(apply, remat, prevent_cse=prevent_cse)

    if self.cfg.scan_layers and cache is None and pipeline.stages() > 1:
      return self._pipelined(x_BLD, positions_BL, mask_BLS, remat, segment_ids_BL), None, {}

    if self.cfg.scan_layers:

      def scan(blocks, x_BLD, cache):
        graphdef, stacked = nnx.split(blocks)
        # Under scan, CSE across iterations is impossible anyway; prevent_cse only costs speed.
        apply = block_fn(graphdef, prevent_cse=False)

        def body(x_BLD: jax.Array, layer: tuple[nnx.State, KVCache | None]):
          x_BLD, layer_cache, stats = apply(layer[0], x_BLD, layer[1])
          return x_BLD, (layer_cache, stats)

        x_BLD, (cache, stats) = jax.lax.scan(body, x_BLD, (stacked, cache))
        return x_BLD, cache, stats

      if self.dense_blocks is None:
        return scan(self.blocks, x_BLD, cache)
      k = first_dense(self.cfg)
      parts = [None, None] if cache is None else [
        {name: c[:k] for name, c in cache.items()},
        {name: c[k:] for name, c in cache.items()},
      ]  # fmt: skip
      x_BLD, first, _ = scan(self.dense_blocks, x_BLD, parts[0])
      x_BLD, rest, stats = scan(self.blocks, x_BLD, parts[1])
      if cache is not None:
        cache = {name: jnp.concatenate([first[name], rest[name]]) for name in cache}
      return x_BLD, cache, stats

    new_layers, layer_stats = [], []
    for i, block in enumerate(self.blocks):
      graphdef, state = nnx.split(block)
      layer_cache = None if cache is None else {name: c[i] for name, c in cache.items()}
      x_BLD, layer_cache, stats = block_fn(graphdef, prevent_cse=True)(state, x_BLD, layer_cache)
      new_layers.append(layer_cache)
      if stats:  # the MoE layers' (a dense block has none)
        layer_stats.append(stats)
    stats = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_stats) if layer_stats else {}
    if cache is None:
      return x_BLD, None, stats
    return x_BLD, {name: jnp.stack([c[name] for c in new_layers]) for name in cache}, stats


def _maybe_remat(fn: Callable, remat: str, *, prevent_cse: bool) -> Callable:
  """Wraps a block function in jax.checkpoint according to cfg.remat."""
  if remat == "none":
    return fn
  return jax.checkpoint(fn, policy=_REMAT_POLICIES[remat], prevent_cse=prevent_cse)
