"""Multi-head, grouped-query and multi-query causal self-attention, with an optional KV cache.

Shapes: B batch, L query length, S key length, D d_model, N query heads, K kv heads,
G = N // K query heads per kv head, H head_dim.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models import context_parallel, lora
from models.config import ModelConfig
from models.layers import Norm, apply_rope, dense, out_proj_std, rope_frequencies
from models.params import make_param, normal
from models.sharding import active_axes, attention_specs, constrain, is_active

KVCache = dict[str, jax.Array]  # {"k": [B, S, K, H], "v": [B, S, K, H]} for one layer


def causal_segment_mask(segment_ids_BL: jax.Array | None, length: int) -> jax.Array:
  """bool[B or 1, L, L]: query t sees key s iff s <= t (index in the row) and same segment."""
  idx = jnp.arange(length)
  causal_LL = idx[:, None] >= idx[None, :]
  if segment_ids_BL is None:
    return causal_LL[None]
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  return causal_LL[None] & same_BLL


def platform() -> str:
  """The platform the program being traced is for: the active mesh's (an ahead-of-time plan for
  a TPU slice traces on a CPU host), else the default backend's."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  found = getattr(device, "platform", None)
  return found or jax.default_backend()


SPLASH_BLOCKS = (512, 256, 128)  # splash block sizes tried, largest first (multiples of 128 lanes)


def compute_capability() -> float | None:
  """The CUDA compute capability of this process's GPUs, or None (no GPU here: a plan traced on
  a CPU host passes its chips' own to ``implementation``)."""
  devices = jax.local_devices()
  found = getattr(devices[0], "compute_capability", None) if devices else None
  try:
    return float(found)
  except (TypeError, ValueError):
    return None


def cudnn_refusal(head_dim: int | None, capability: float | None = None) -> str:
  """Why cuDNN's fused attention cannot take this model's packed rows ("" if it can): JAX's
  binding runs packed (ragged) rows on Hopper or later only (compute capability 9.0), for head
  widths that are multiples of 8 up to 256."""
  capability = compute_capability() if capability is None else capability
  if capability is not None and capability < 9.0:
    return (
      f"cuDNN's attention on packed rows needs a Hopper or later GPU (compute capability 9.0; "
      f"this one has {capability:g})"
    )
  if head_dim is not None and not (head_dim <= 256 and head_dim % 8 == 0):
    return f"cuDNN's flash attention needs model.head_dim a multiple of 8, at most 256 ({head_dim})"
  return ""


def implementation(
  choice: str,
  dtype,
  length: int,
  where: str | None = None,
  head_dim: int | None = None,
  capability: float | None = None,
) -> str:
  """The kernel that computes training attention: ``model.attention`` resolved for this program.

  ``auto``: cuDNN flash attention on GPUs in bf16/fp16 where it takes the packed rows
  (``cudnn_refusal``: Hopper or later, ``head_dim`` a multiple of 8 up to 256), Pallas splash
  attention on TPUs when the row length is a multiple of 128, the XLA einsum (the reference)
  otherwise. An explicit choice the platform cannot run is an error; ``splash`` off TPUs runs in
  Pallas interpret mode (exact, slow: for checking, as the tests do). ``capability``: the GPUs'
  compute capability where the caller knows it (a plan), else read from the devices.
  """
  where = where or platform()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  splash_fits = length % SPLASH_BLOCKS[-1] == 0
  if choice == "auto":
    if where == "gpu" and half and not cudnn_refusal(head_dim, capability):
      return "cudnn"
    if where == "tpu" and splash_fits:
      return "splash"
    return "xla"
  if choice == "cudnn" and (where != "gpu" or not half):
    raise ValueError(
      f"model.attention='cudnn' needs a GPU and model.dtype bfloat16 or float16 (here: {where}, "
      f"{jnp.dtype(dtype).name}); use 'auto' or 'xla'"
    )
  if choice == "cudnn" and (why := cudnn_refusal(head_dim, capability)):
    raise ValueError(f"model.attention='cudnn': {why}; use 'auto' or 'xla'")
  if choice == "splash" and not splash_fits:
    raise ValueError(
      f"model.attention='splash' needs rows of a multiple of {SPLASH_BLOCKS[-1]} tokens "
      f"(data.seq_len={length}); use 'auto' or 'xla', or such a data.seq_len"
    )
  return choice


def context_kernel(
  choice: str, dtype, length: int, shards: int, form: str, where: str | None = None
) -> str:
  """The kernel that computes training attention when a context axis splits each row into
  ``shards`` stripes (models/context_parallel.py): "splash" or "xla".

  Splash runs per shard in the all-gather form wherever it would run on unsplit rows (TPUs, or
  asked for) and each shard's L / C queries are a multiple of 128 (``splash_attention``). The
  other cases keep the XLA math inside shard_map: the ring form folds each step's block into an
  online softmax, which needs the block's log-sum-exp and its own gradient rule; cuDNN's masks
  (causal, padding) cannot say which keys a striped shard's queries may see (query j of shard r
  is token j·C + r of the row).
  """
  if choice == "cudnn":  # an explicit choice that cannot run is an error (``implementation``)
    raise ValueError(
      f"model.attention='cudnn' cannot run under {shards} context shards: cuDNN's masks cannot "
      "say which keys a striped shard's queries may see; use 'auto' (the XLA math on GPUs) or "
      "'xla'"
    )
  if form != "all_gather" or implementation(choice, dtype, length, where) != "splash":
    return "xla"
  local = length // shards
  if local % SPLASH_BLOCKS[-1]:
    if choice == "splash":
      raise ValueError(
        f"model.attention='splash' under {shards} context shards needs each shard's "
        f"data.seq_len / {shards} = {local} tokens to be a multiple of {SPLASH_BLOCKS[-1]}; "
        "use 'auto' or 'xla', or such a data.seq_len"
      )
    return "xla"
  return "splash"


def segment_runs(segment_ids_BL: jax.Array, max_runs: int) -> tuple[jax.Array, jax.Array]:
  """Packed rows in cuDNN's ragged form: (lengths [B, M], offsets [B, M + 1]), int32, M = max_runs.

  Each run of equal segment ids (padding's 0s included, so every token is in some run) is one
  sequence: offsets[b, m] is where run m starts, lengths[b, m] how long it is; -1 past the last
  run. cuDNN keeps float32 softmax statistics for B·M sequences of the full row length, so M is
  a bound (``model.max_segments``), not the row length: at M = L a 2048-token row needs
  quadratic memory (gpt2_small, 16 rows: a 257 GiB allocation on an H200). Runs past M would be
  dropped, so the host checks every batch first (``check_runs``).
  """
  b, length = segment_ids_BL.shape
  starts_BL = jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1
  )
  run_BL = jnp.cumsum(starts_BL, axis=1) - 1  # which run each token is in
  rows_B1 = jnp.arange(b)[:, None]
  lengths = jnp.zeros((b, max_runs), jnp.int32).at[rows_B1, run_BL].add(1, mode="drop")
  runs_B1 = run_BL[:, -1:] + 1
  lengths = jnp.where(jnp.arange(max_runs)[None] < runs_B1, lengths, -1)
  target_BL = jnp.where(starts_BL & (run_BL < max_runs), run_BL, max_runs + 1)  # else dropped
  offsets = jnp.full((b, max_runs + 1), -1, jnp.int32)
  index_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  offsets = offsets.at[rows_B1, target_BL].set(index_BL, mode="drop")
  return lengths, offsets


def runs_per_row(segment_ids_BL: np.ndarray) -> np.ndarray:
  """Host side: how many runs of equal segment ids (documents and padding) each row holds."""
  return 1 + np.count_nonzero(segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1], axis=1)


def check_runs(segment_ids_BL: np.ndarray, max_segments: int) -> None:
  """Raises ValueError if a packed row holds more runs than cuDNN attention is built for."""
  most = int(runs_per_row(np.asarray(segment_ids_BL)).max(initial=0))
  if most > max_segments:
    raise ValueError(
      f"a packed row holds {most} documents (padding counted as one), more than "
      f"model.max_segments={max_segments} that cuDNN attention is compiled for; set "
      f"model.max_segments to at least {most}, or model.attention='xla'"
    )


@contextlib.contextmanager
def cudnn_checks_for(device: jax.Device):
  """While a program for ``device`` is traced, JAX's cuDNN attention checks read its compute
  capability.

  JAX's binding checks the head dim (up to 256 from Hopper on, else 128) and packed rows (Hopper
  on) against the first GPU of the *default* backend. A plan traces on a CPU host for
  compile-only GPUs, where those checks find no GPU: they would refuse packed rows and head dim
  256 for an H100. Within this context the binding's two capability checks answer for
  ``device`` instead (its checks of shapes and the cuDNN release still run). A no-op unless
  ``device`` is a GPU and the default backend is not. Process-wide while it lasts: trace one
  program at a time inside it. The checks run when the backward pass is traced, which for a
  rematerialised or scanned layer is after the layer's call returns, so the caller wraps the
  whole lowering (``train/planning.py``), not the attention call.
  """
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or capability is None or jax.default_backend() == "gpu":
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415 (GPU only)

  have = tuple(int(x) for x in str(capability).split("."))

  def at_least(wanted: str) -> bool:
    return have >= tuple(int(x) for x in wanted.split("."))

  def equal(wanted: str) -> bool:
    return have == tuple(int(x) for x in wanted.split("."))

  with (
    mock.patch.object(cudnn, "check_compute_capability", at_least),
    mock.patch.object(cudnn, "is_cuda_compute_capability_equal", equal),
  ):
    yield


def cudnn_attention(
  q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float, max_segments: int
) -> jax.Array:
  """cuDNN flash attention, causal, with packed rows as ragged sequences (GPU only), sharded
  over batch and heads by shard_map.

  ``jax.nn.dot_product_attention`` cannot express segments except as a materialised [B, 1, L, L]
  mask (or one length per row, which ignores packing, the trap of MaxText #4476), so this uses
  the cuDNN binding under it, which takes each row's runs as offsets and lengths. Each device
  runs it on its own rows: left to the binding's own partitioning, a program for 8 GPUs passed
  cuDNN the lengths of a device's 2 rows but the offsets of all 16 (gathered), so every device
  would read the first rows' document boundaries for its own (seen compiling for 8 H100s,
  tests/test_plan_gpu.py).
  """
  runs = min(max_segments, q_BLNH.shape[1])

  def attend(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL):
    return _cudnn_local(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale, runs)

  if not is_active():
    return attend(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
  k_BSKH, v_BSKH, q_spec, kv_spec, ids_spec = attention_specs(
    q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, None
  )
  return jax.shard_map(
    attend, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec, check_vma=False
  )(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)


def _cudnn_local(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float, runs: int) -> jax.Array:
  """One device's cuDNN attention (``cudnn_attention``): ``runs`` ragged sequences per row."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415 (GPU only)

  if segment_ids_BL is None:
    return cudnn.dot_product_attention(
      q_BLNH, k_BSKH, v_BSKH, scale=scale, mask_type=cudnn.MaskType.CAUSAL, qkv_layout="BTNH"
    )
  lengths, offsets = segment_runs(segment_ids_BL, runs)
  # Grouped-query models get their keys and values repeated to the query heads: JAX's binding
  # (0.10.x) steps through the packed keys' offsets by the query heads' width (N·H per token,
  # where K·H is the keys'), so with K < N every document but a row's first would read other
  # tokens' keys.
  # JAX 0.11.2's binding passed the GPU suite's packed equality check with grouped heads on an
  # H200 (docs/gpus.md), so there the keys keep their own heads.
  groups = q_BLNH.shape[2] // k_BSKH.shape[2]
  if groups > 1 and jax.__version_info__ < (0, 11, 2):
    k_BSKH, v_BSKH = (jnp.repeat(x, groups, axis=2) for x in (k_BSKH, v_BSKH))
  return cudnn.dot_product_attention(
    q_BLNH,
    k_BSKH,
    v_BSKH,
    q_seqlen=lengths,
    kv_seqlen=lengths,
    q_offsets=offsets,
    kv_offsets=offsets,
    scale=scale,
    mask_type=cudnn.MaskType.PADDING_CAUSAL,
    qkv_layout="BTNH",
  )


def _striped_causal_mask(masks, length: int, shards: int):
  """Splash's causal mask (``masks``: splash_attention_mask) for rows in the striped layout
  (models/context_parallel.py): query slot p = r·(L/C) + j is token j·C + r of the row, its
  ``q_sequence`` entry, which the kernel compares with each key's index (keys in row order).
  Splash classifies every [block, block] tile of the [L, L] mask on the host; the tiles wholly
  below or above the diagonal are answered without evaluating them (131,072 tokens, 2 stripes:
  1.7 s on a 2-core Xeon; evaluating every tile took 3.3 s at 32,768 tokens, ~53 s at 131,072
  by its quadratic growth)."""

  class Striped(masks.CausalMask):
    def __init__(self):
      super().__init__((length, length))
      j = np.arange(length // shards, dtype=np.int32)
      self.q_sequence = (j[None, :] * shards + np.arange(shards, dtype=np.int32)[:, None]).ravel()

    def __getitem__(self, idx):
      rows, (start, stop, _) = self.q_sequence[idx[0]], idx[1].indices(length)
      if rows.max() < start:  # every key after every query
        return np.zeros((1, 1), np.bool_)
      if rows.min() >= stop - 1:  # every key at or before every query
        return np.ones((1, 1), np.bool_)
      return super().__getitem__(idx)

  return Striped()


def _splash_kernel(heads: int, length: int, interpret: bool, shards: int = 1, head_shards: int = 1):
  """The kernel for ``heads`` heads of rows of ``length``: built inside each trace (its mask
  tables become constants of that program; kept across traces they would leak tracers). With
  ``shards`` > 1, for striped rows whose queries are split into that many stripes (the kernel's
  mask tables are then split with them, ``q_seq_shards``) and keys whole."""
  # The TPU kernels (Pallas): imported only when splash attention is asked for.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
    splash_attention_kernel as splash,
  )
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
    splash_attention_mask as masks,
  )

  block = next(b for b in SPLASH_BLOCKS if (length // shards) % b == 0)
  sizes = splash.BlockSizes(
    block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
    block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
  )  # fmt: skip
  if shards > 1:
    mask = _striped_causal_mask(masks, length, shards)
  else:
    mask = masks.CausalMask((length, length))
  kernel = splash.make_splash_mha(
    masks.MultiHeadMask([mask] * heads),
    block_sizes=sizes,
    head_shards=head_shards,
    q_seq_shards=shards,
    interpret=interpret,
  )
  return kernel, splash.SegmentIds


_warned_interpret = False


def splash_attention(
  q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, scale: float, shards: int = 1
) -> jax.Array:
  """Pallas splash attention (causal, segment ids), sharded over batch and heads by shard_map.

  Each device runs the kernel on its rows and heads. When query heads are split over devices
  but key/value heads are not, k and v are repeated to one per query head first, so every
  shard's groups line up. With ``shards`` > 1 the rows are striped and their length split over
  the context axes (models/context_parallel.py, ``context_kernel``): see ``_splash_striped``.
  """
  global _warned_interpret
  interpret = platform() != "tpu"
  if interpret and not _warned_interpret:
    _warned_interpret = True
    logging.warning("model.attention='splash' off a TPU runs in Pallas interpret mode (slow)")
  q_BLNH = q_BLNH * jnp.asarray(scale, q_BLNH.dtype)
  if shards > 1:
    return _splash_striped(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, shards, interpret)

  def attend(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL):
    kernel, segment_ids = _splash_kernel(q_BLNH.shape[2], q_BLNH.shape[1], interpret)

    def one_row(q_NLH, k_KSH, v_KSH, ids_L):
      ids = None if ids_L is None else segment_ids(q=ids_L, kv=ids_L)
      return kernel(q_NLH, k_KSH, v_KSH, segment_ids=ids)

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    args = (heads_first(q_BLNH), heads_first(k_BSKH), heads_first(v_BSKH), segment_ids_BL)
    out_BNLH = jax.vmap(one_row, in_axes=(0, 0, 0, None if segment_ids_BL is None else 0))(*args)
    return heads_first(out_BNLH)

  if not is_active():
    return attend(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)
  k_BSKH, v_BSKH, q_spec, kv_spec, ids_spec = attention_specs(
    q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, None
  )
  return jax.shard_map(
    attend, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec, check_vma=False
  )(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL)


def _splash_striped(q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, shards: int, interpret: bool):
  """Splash attention of striped rows split into ``shards`` stripes over the context axes (q
  already scaled): each device all-gathers its rows' keys, values and segment ids over those
  axes, puts them back in row order, and runs the kernel for its own stripe of queries against
  the whole row. The kernel is built once for the whole [L, L] striped mask, its tables split
  over the query stripes and the head shards (``q_seq_shards``, ``head_shards``) and handed to
  shard_map with its partition spec, so each device reads its own stripe's tiles and query
  positions. Per device the scores never exist beyond one tile, as without a context axis."""
  axes, _ = context_parallel.context_axes()
  k_BLKH, v_BLKH, q_spec, kv_spec, ids_spec = attention_specs(
    q_BLNH, k_BLKH, v_BLKH, segment_ids_BL, "length"
  )
  n = q_BLNH.shape[2]
  mesh = jax.sharding.get_abstract_mesh()
  _, head_shards = active_axes(("batch", "length", "heads", None), 2)
  kernel, segment_ids = _splash_kernel(n, q_BLNH.shape[1], interpret, shards, head_shards)
  tables = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(q_spec[2], q_spec[1]))

  def attend(kernel, q_BLNH, k_BLKH, v_BLKH, ids_BL):
    def whole(x):  # gathered shard-major is the striped order: back to the row's
      gathered = jax.lax.all_gather(x, axes, axis=1, tiled=True)
      return context_parallel.from_striped(gathered, shards)

    k_BSKH, v_BSKH = whole(k_BLKH), whole(v_BLKH)
    ids_BS = None if ids_BL is None else whole(ids_BL)

    def one_row(q_NLH, k_KSH, v_KSH, q_ids_L, kv_ids_S):
      ids = None if q_ids_L is None else segment_ids(q=q_ids_L, kv=kv_ids_S)
      return kernel(q_NLH, k_KSH, v_KSH, segment_ids=ids)

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    rows = None if ids_BL is None else 0
    out_BNLH = jax.vmap(one_row, in_axes=(0, 0, 0, rows, rows))(
      heads_first(q_BLNH), heads_first(k_BSKH), heads_first(v_BSKH), ids_BL, ids_BS
    )
    return heads_first(out_BNLH)

  in_specs = (kernel.manual_sharding_spec(tables), q_spec, kv_spec, kv_spec, ids_spec)
  return jax.shard_map(attend, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
    kernel, q_BLNH, k_BLKH, v_BLKH, segment_ids_BL
  )


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
    self.attention = cfg.attention
    self.attention_context = cfg.attention_context
    self.quant = cfg.quant
    self.max_segments = cfg.max_segments
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
    y_BLnH = dense(x_BLD, kernel[...].astype(self.dtype), quant=self.quant)
    if adapter is not None:
      y_BLnH = y_BLnH + adapter(x_BLD)
    return y_BLnH if bias is None else y_BLnH + bias[...].astype(self.dtype)

  def __call__(
    self,
    x_BLD: jax.Array,
    positions_BL: jax.Array,
    mask_BLS: jax.Array | None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int | None = None,
    segment_ids_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """Attends x to itself (cache None) or to the cache after writing x's keys at cache_index.

    mask_BLS: bool, broadcastable to [B, L, S]; True where query L may attend to key S. None
    (training without a cache only) means causal within the segments of ``segment_ids_BL``
    (None: one per row), computed by the kernel ``model.attention`` names; no mask is built.
    With the row split over a context axis (models/context_parallel.py), mask None means the
    row is in the striped layout and ``model.attention_context`` computes it.
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
    if mask_BLS is None and cache is None and context_parallel.shards() > 1:
      kernel = "context"
    elif mask_BLS is not None:
      kernel = "xla"
    else:
      kernel = implementation(self.attention, self.dtype, length, head_dim=q_BLNH.shape[-1])
    if kernel == "xla" and mask_BLS is None:  # the reference, for a caller that built no mask
      mask_BLS = causal_segment_mask(segment_ids_BL, length)
    if kernel == "context":
      c = context_parallel.shards()
      if context_kernel(self.attention, self.dtype, length, c, self.attention_context) == "splash":
        out_BLNH = splash_attention(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, self.scale, c)
      else:
        out_BLNH = context_parallel.attention(
          q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, self.scale, self.attention_context, self.block
        )
    elif kernel != "xla":
      if kernel == "cudnn":
        out_BLNH = cudnn_attention(
          q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, self.scale, self.max_segments
        )
      else:
        out_BLNH = splash_attention(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, self.scale)
    elif cache is None and 0 < self.block < length:
      out_BLNH = self._attend_blocked(q_BLNH, k_BSKH, v_BSKH, mask_BLS)
    else:
      out_BLNH = self._attend(q_BLNH, k_BSKH, v_BSKH, mask_BLS)
    out_BLNH = checkpoint_name(out_BLNH, "attention")
    y_BLD = dense(out_BLNH, self.out_kernel[...].astype(self.dtype), contract=2, quant=self.quant)
    if self.out_lora is not None:
      y_BLD = y_BLD + self.out_lora(out_BLNH)
    if self.out_bias is not None:
      y_BLD = y_BLD + self.out_bias[...].astype(self.dtype)
    return y_BLD, cache

  def _attend(self, q_BLNH, k_BSKH, v_BSKH, mask_BLS) -> jax.Array:
    """Softmax attention of every query row over all S keys (masked): [B, L, N, H]."""
    b, length, n, h = q_BLNH.shape
    q_BLKGH = self._grouped_queries(q_BLNH)
    logits_BKGLS = jnp.einsum(
      "BLKGH,BSKH->BKGLS", q_BLKGH, k_BSKH, preferred_element_type=jnp.float32
    )
    probs_BKGLS = self._masked_softmax(logits_BKGLS, mask_BLS[:, None, None, :, :])
    out_BLKGH = jnp.einsum("BKGLS,BSKH->BLKGH", probs_BKGLS, v_BSKH)
    return out_BLKGH.reshape(b, length, n, h)

  def _grouped_queries(self, q_BLNH) -> jax.Array:
    """Scaled queries with their heads split into [K, G]: grouped-query attention without
    repeating k/v. [B, L, K, G, H]."""
    b, length, n, h = q_BLNH.shape
    kv = self.num_kv_heads
    return (q_BLNH * jnp.asarray(self.scale, self.dtype)).reshape(b, length, kv, n // kv, h)

  def _masked_softmax(self, logits_BKGLS, mask_B11LS) -> jax.Array:
    """Float32 scores where the mask allows, the lowest float32 elsewhere, softmax over keys."""
    logits_BKGLS = jnp.where(mask_B11LS, logits_BKGLS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits_BKGLS, axis=-1).astype(self.dtype)

  def _attend_blocked(self, q_BLNH, k_BSKH, v_BSKH, mask_BLS) -> jax.Array:
    """Causal attention by blocks of ``attention_block`` queries, each over the keys up to its
    own end: the key blocks above the diagonal, masked anyway, are never computed (about half
    the score and value FLOPs and memory at long rows). Exact: the same softmax per row."""
    b, length, n, h = q_BLNH.shape
    # Head-major once per layer, not once per block: each block's query rows and key prefix
    # would otherwise be transposed for its dots on their own.
    q_BKGLH = self._grouped_queries(q_BLNH).transpose(0, 2, 3, 1, 4)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    outs = []
    for lo in range(0, length, self.block):
      hi = min(lo + self.block, length)
      logits_BKGLS = jnp.einsum(
        "BKGLH,BKSH->BKGLS", q_BKGLH[:, :, :, lo:hi], k_BKSH[:, :, :hi],
        preferred_element_type=jnp.float32,
      )  # fmt: skip
      probs_BKGLS = self._masked_softmax(logits_BKGLS, mask_BLS[:, None, None, lo:hi, :hi])
      outs.append(jnp.einsum("BKGLS,BKSH->BKGLH", probs_BKGLS, v_BKSH[:, :, :hi]))
    out_BKGLH = jnp.concatenate(outs, axis=3)
    return out_BKGLH.transpose(0, 3, 1, 2, 4).reshape(b, length, n, h)
