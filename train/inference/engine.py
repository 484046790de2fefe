"""The compiled prefill/decode engine with a KV cache on the training mesh.

How a batch of prompts of different lengths stays exact. ``Transformer.decode`` writes every row at
the same cache slot, so rows cannot be padded to a common length without attending to the padding.
Instead all rows walk the slots together from slot 0: the prompt's first ``m - 1`` tokens (``m`` =
the shortest prompt) are prefilled, in chunks whose lengths are powers of two (each chunk length is
compiled once), then one compiled decode step runs per slot. At slot ``s`` a row whose prompt is
longer than ``s + 1`` is fed its own prompt token (teacher forcing); the others are fed the token
just sampled. No row ever sees a padding token, so each row gets the logits (and greedy tokens)
it would get alone.

Sampling (``train/inference/sampling.py``): row ``i`` draws with the key
``fold_in(fold_in(key(seed), i), slot)``: reproducible for a seed, independent of the batch size;
a sampled row's draws follow its position ``i`` in the request, so the same prompt in another
position samples other tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

import models
from models.config import ModelConfig
from train.cluster import mesh as mesh_lib
from train.inference.sampling import Sampling, sample

CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this (fewer recompiles)


# --- the compiled functions (pure; the Engine binds graphdef and sampling and compiles them) ---


def _init_cache(params, *, graphdef: nnx.GraphDef, batch: int, length: int) -> dict[str, jax.Array]:
  return nnx.merge(graphdef, params).init_cache(batch, length)


def _prefill(params, cache, tokens_BL: jax.Array, start: jax.Array, *, graphdef: nnx.GraphDef):
  """Writes a chunk of prompt tokens at slots start .. start + L - 1; the logits are unused."""
  batch, length = tokens_BL.shape
  positions_BL = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
  _, cache = nnx.merge(graphdef, params).decode(tokens_BL, positions_BL, cache, start)
  return cache


def _decode_step(
  params,
  cache,
  prompts_BS,
  lengths_B,
  token_B,
  index,
  keys_B,
  *,
  graphdef: nnx.GraphDef,
  sampling: Sampling,
  logps: bool = False,
):
  """Feeds the token at slot ``index``; returns the cache, the token for slot index + 1 and the
  logits it was chosen from (the prompt's own token while a row is still inside its prompt).
  With ``logps``, instead of the logits [B, V], the chosen token's log-probability [B] under
  the tempered logits (temperature 1 when greedy), before top-k and top-p, as GRPO's
  train step computes it (``train/grpo.py``): no vocabulary-wide array leaves the device."""
  batch = token_B.shape[0]
  positions_B1 = jnp.full((batch, 1), index, jnp.int32)
  logits_B1V, cache = nnx.merge(graphdef, params).decode(
    token_B[:, None], positions_B1, cache, index
  )
  logits_BV = logits_B1V[:, 0]
  slot = index + 1
  step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(
    jax.random.wrap_key_data(keys_B), slot
  )
  sampled_B = sample(logits_BV, step_keys_B, sampling)
  prompt_token_B = jax.lax.dynamic_index_in_dim(prompts_BS, slot, axis=1, keepdims=False)
  token_B = jnp.where(slot < lengths_B, prompt_token_B, sampled_B)
  if logps:
    scaled_BV = logits_BV.astype(jnp.float32) / (sampling.temperature or 1.0)
    logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
    return cache, token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
  return cache, token_B, logits_BV


def chunk_lengths(tokens: int) -> list[int]:
  """Powers of two summing to ``tokens``, largest first: the prefill chunks (13 -> [8, 4, 1])."""
  return [1 << bit for bit in reversed(range(tokens.bit_length())) if tokens >> bit & 1]


@dataclasses.dataclass
class Generation:
  """What one ``Engine.run`` produced: token ids per prompt, why each stopped, and timings."""

  tokens: list[list[int]]  # generated ids per prompt (the end-of-document id not included)
  stop_reasons: list[str]  # "eod" | "max_new_tokens" | "context"
  logits: list[np.ndarray] | None  # per prompt [generated, V] when record_logits, else None
  logps: list[np.ndarray] | None  # per prompt [generated] when record_logps, else None
  compile_seconds: float
  prefill_tokens: int
  time_to_first_token_s: float
  decode_seconds: float
  decode_tokens: int  # those taken after the first token: the ones decode_seconds produced
  decode_steps: int
  bytes_per_decode_step: int
  mean_context: float  # mean attended length over the generated tokens


class Engine:
  """Compiled prefill and decode steps for one model on one mesh; reused across calls.

  The cache lives on the mesh with the logical axes ``models.CACHE_AXES`` (batch over the
  data-parallel axes, kv heads over tensor); the batch is padded to the data-parallel size.
  """

  def __init__(
    self,
    graphdef: nnx.GraphDef,
    model_cfg: ModelConfig,
    mesh: jax.sharding.Mesh,
    rules: mesh_lib.Rules,
  ):
    self.graphdef, self.model_cfg, self.mesh, self.rules = graphdef, model_cfg, mesh, rules
    self.data_parallel = mesh_lib.data_parallel_size(mesh, rules)
    self.cache_sharding = self._named(models.CACHE_AXES)
    self._rows = self._named(("batch",))
    # Prompts and chunks of any length (one token per decoding step): never split over the
    # context axis, which only training rows use (models/context_parallel.py).
    self._rows_2d = self._named(("batch", None))
    self._replicated = mesh_lib.replicated(mesh)
    self._compiled: dict[tuple, Any] = {}
    self.compile_seconds = 0.0

  def _named(self, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(self.mesh, mesh_lib.partition_spec(names, self.rules))

  def _compile(
    self,
    key: tuple,
    fn: Callable,
    args: tuple,
    in_shardings: tuple,
    out_shardings: Any,
    donate: tuple[int, ...] = (),
  ) -> Any:
    """AOT-compiles once per key, so timings exclude compilation and reuse is explicit."""
    if key not in self._compiled:
      start = time.perf_counter()
      # in_shardings may be a prefix of args (one sharding for the whole cache): broadcast it.
      abstract = jax.tree.map(
        lambda s, sub: jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub
        ),
        in_shardings,
        args,
      )
      jitted = jax.jit(
        fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate
      )
      with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
        self._compiled[key] = jitted.lower(*abstract).compile()
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[key]

  def compile(
    self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling
  ) -> tuple[Any, Any, list[tuple[int, Any]]]:
    """Compiles, without running, what ``run`` would: the cache initialiser, the decode step
    and the prefill chunks [(length, program)]. ``params`` may be ShapeDtypeStructs with
    shardings (compiling for devices this process does not drive, as the GPU plan's tests do)."""
    layout = _Layout.of(prompts, max_new_tokens, self.model_cfg.max_seq_len, self.data_parallel)
    return self._programs(params, layout, sampling)

  def _put(self, array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Every process holds the same host array; each places only its addressable shards.
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  def run(
    self,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int,
    eod_id: int | None,
    on_token: Callable[[int, int], None] | None = None,
    record_logits: bool = False,
    record_logps: bool = False,
    on_start: Callable[[], None] | None = None,
  ) -> Generation:
    """Generates up to ``max_new_tokens`` after each prompt (token ids); see the module docstring.

    on_token(row, token_id) is called as each generated token reaches the host; on_start() once
    the programs are compiled, as the generation's clock starts (an energy counter's span).
    ``record_logits``: each generated token's logits [V]; ``record_logps`` (not with it): each
    one's log-probability at the sampling temperature, computed on the devices.
    """
    if record_logits and record_logps:
      raise ValueError("record_logits and record_logps: choose one")
    layout = _Layout.of(prompts, max_new_tokens, self.model_cfg.max_seq_len, self.data_parallel)
    make_cache, step_fn, prefills = self._programs(params, layout, sampling, record_logps)
    inputs = (
      self._put(layout.prompts_BS, self._rows_2d),
      self._put(layout.lengths_B, self._rows),
      self._put(_row_keys(seed, layout.batch), self._named(("batch", None))),
    )
    record = "logits" if record_logits else "logps" if record_logps else None
    collector = _Collector(layout, max_new_tokens, eod_id, on_token, record)
    if on_start is not None:
      on_start()
    start = time.perf_counter()
    cache = make_cache(params)
    offset = 0
    for length, prefill in prefills:
      chunk = np.ascontiguousarray(layout.prompts_BS[:, offset : offset + length])
      cache = prefill(params, cache, self._put(chunk, self._rows_2d), np.int32(offset))
      offset += length
    token = self._put(layout.prompts_BS[:, layout.shortest - 1], self._replicated)
    cache, steps = self._decode(step_fn, params, cache, token, inputs, layout, collector)
    end = time.perf_counter()
    # Bytes every device reads per step, summed: all weights and the whole cache (masked slots
    # included), shard by shard, so replicated copies count once per device that holds one.
    read_bytes = jax.process_count() * sum(
      shard.data.nbytes for x in jax.tree.leaves((params, cache)) for shard in x.addressable_shards
    )
    return collector.result(
      start=start,
      end=end,
      compile_seconds=self.compile_seconds,
      decode_steps=steps,
      bytes_per_decode_step=read_bytes,
    )

  def _programs(self, params, layout: _Layout, sampling: Sampling, logps: bool = False):
    """The compiled cache initialiser, decode step and prefill chunks [(length, fn)]."""
    graphdef, batch, cache_len = self.graphdef, layout.batch, layout.cache_len
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    init_cache = functools.partial(_init_cache, graphdef=graphdef, batch=batch, length=cache_len)
    make_cache = self._compile(
      ("cache", batch, cache_len), init_cache, (params,), (param_shardings,), self.cache_sharding
    )
    cache_abstract = jax.eval_shape(init_cache, params)
    lengths_B, keys_B = layout.lengths_B, _row_keys(0, batch)  # shapes only
    step_fn = self._compile(
      ("step", batch, cache_len, sampling, logps),
      functools.partial(_decode_step, graphdef=graphdef, sampling=sampling, logps=logps),
      (params, cache_abstract, layout.prompts_BS, lengths_B, lengths_B, np.int32(0), keys_B),
      # The fed token is the previous step's output, replicated so every process can read it.
      (
        param_shardings,
        self.cache_sharding,
        self._rows_2d,
        self._rows,
        self._replicated,
        self._replicated,
        self._named(("batch", None)),
      ),
      (
        self.cache_sharding,
        self._replicated,
        self._rows if logps else self._named(("batch", "vocab")),
      ),
      donate=(1,),
    )
    prefills = [
      (
        length,
        self._compile(
          ("prefill", batch, cache_len, length),
          functools.partial(_prefill, graphdef=graphdef),
          (params, cache_abstract, np.zeros((batch, length), np.int32), np.int32(0)),
          (param_shardings, self.cache_sharding, self._rows_2d, self._replicated),
          self.cache_sharding,
          donate=(1,),
        ),
      )
      for length in chunk_lengths(layout.shortest - 1)
    ]
    return make_cache, step_fn, prefills

  def _decode(self, step_fn, params, cache, token, inputs, layout: _Layout, collector: _Collector):
    """One compiled step per slot; step N+1 is dispatched before step N's token is read."""
    prompts_dev, lengths_dev, keys_dev = inputs
    sync_each_step = mesh_lib.bound_steps_in_flight()
    index, steps, pending = layout.shortest - 1, 0, None
    while True:
      current = None
      if index < layout.last_slot:
        cache, token, logits = step_fn(
          params, cache, prompts_dev, lengths_dev, token, np.int32(index), keys_dev
        )
        index, steps = index + 1, steps + 1
        current = (index, token, logits)
        if sync_each_step:
          token.block_until_ready()
      if pending is not None and collector.take(*pending):
        break
      if current is None and pending is None:
        break
      pending = current
    return cache, steps


def _row_keys(seed: int, batch: int) -> np.ndarray:
  """Raw PRNG key data [batch, 2]: row i samples with fold_in(key(seed), i)."""
  base = jax.random.key(seed)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(batch))
  return np.asarray(jax.random.key_data(keys))


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where each prompt sits: the padded batch, the cache length and each row's token budget."""

  lengths: list[int]  # prompt tokens per row
  new: list[int]  # tokens each row may generate (the context bounds each row)
  batch: int  # rows padded to a multiple of the data-parallel size
  last_slot: int
  cache_len: int
  prompts_BS: np.ndarray  # int32 [batch, cache_len]
  lengths_B: np.ndarray  # int32 [batch]

  @property
  def shortest(self) -> int:
    return min(self.lengths)

  @classmethod
  def of(cls, prompts, max_new_tokens: int, context: int, data_parallel: int) -> _Layout:
    check_prompts(prompts, context)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    lengths = [len(p) for p in prompts]
    new = [min(max_new_tokens, context - n) for n in lengths]
    batch = -(-len(prompts) // data_parallel) * data_parallel
    last_slot = max(n + k for n, k in zip(lengths, new, strict=True)) - 1
    cache_len = min(context, -(-last_slot // CACHE_BUCKET) * CACHE_BUCKET)
    # Rows past the prompts repeat prompt 0: the mesh needs the batch divisible by its size.
    padded = [list(p) for p in prompts] + [list(prompts[0])] * (batch - len(prompts))
    prompts_BS = np.zeros((batch, cache_len), np.int32)
    for i, p in enumerate(padded):
      prompts_BS[i, : min(len(p), cache_len)] = p[:cache_len]
    lengths_B = np.asarray([len(p) for p in padded], np.int32)
    return cls(lengths, new, batch, last_slot, cache_len, prompts_BS, lengths_B)


def _to_host(array: jax.Array) -> np.ndarray:
  """The whole array on this host; with several processes, every process's shards gathered."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class _Collector:
  """Takes each decode step's tokens on the host: per-row stops, streaming, and the recorded
  logits or log-probs (``record``: "logits" | "logps" | None)."""

  def __init__(self, layout: _Layout, max_new_tokens: int, eod_id, on_token, record):
    self.layout, self.max_new_tokens, self.eod_id = layout, max_new_tokens, eod_id
    self.on_token, self.record = on_token, record
    rows = len(layout.lengths)
    self.generated: list[list[int]] = [[] for _ in range(rows)]
    self.recorded: list[list[np.ndarray]] = [[] for _ in range(rows)]
    self.reasons = [""] * rows
    self.first_token_at: float | None = None
    self.before_decode = 0  # tokens taken with the first (in the time to the first token)

  def take(self, slot: int, token_dev, logits_dev) -> bool:
    """Reads the tokens chosen for ``slot``; returns True once every row has stopped."""
    token_host = _to_host(token_dev)
    logits_host = _to_host(logits_dev) if self.record else None
    new = self.layout.new
    first = self.first_token_at is None
    for row, length in enumerate(self.layout.lengths):
      if self.reasons[row] or slot < length:
        continue
      if self.first_token_at is None:
        self.first_token_at = time.perf_counter()
      tok = int(token_host[row])
      if first and tok != self.eod_id:
        self.before_decode += 1
      if logits_host is not None:
        self.recorded[row].append(logits_host[row])
      if self.eod_id is not None and tok == self.eod_id:
        self.reasons[row] = "eod"
        continue
      self.generated[row].append(tok)
      if self.on_token is not None:
        self.on_token(row, tok)
      if len(self.generated[row]) == new[row]:
        self.reasons[row] = "max_new_tokens" if new[row] == self.max_new_tokens else "context"
    return all(self.reasons)

  def result(self, *, start: float, end: float, **figures) -> Generation:
    first_token_at = self.first_token_at or end
    lengths, generated = self.layout.lengths, self.generated
    contexts = [lengths[r] + t for r in range(len(lengths)) for t in range(len(generated[r]))]
    logits = logps = None
    if self.record == "logits":
      logits = [np.stack(r) if r else np.zeros((0,)) for r in self.recorded]
    if self.record == "logps":
      logps = [np.asarray(r, np.float32) for r in self.recorded]
    return Generation(
      tokens=generated,
      stop_reasons=[reason or "context" for reason in self.reasons],
      logits=logits,
      logps=logps,
      prefill_tokens=len(lengths) * self.layout.shortest,
      time_to_first_token_s=first_token_at - start,
      decode_seconds=end - first_token_at,
      decode_tokens=sum(map(len, generated)) - self.before_decode,
      mean_context=statistics.fmean(contexts) if contexts else float(self.layout.shortest),
      **figures,
    )


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
  """Empty prompts and prompts that leave no room in the context are errors naming the lengths."""
  if not prompts:
    raise ValueError("no prompts given; pass --prompt TEXT or --prompts_file FILE")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"prompt {i} is empty; give at least one character")
    if len(p) >= context:
      raise ValueError(
        f"prompt {i} is {len(p)} tokens but the model's context (model.max_seq_len) is {context} "
        f"tokens; a prompt may have at most {context - 1} tokens to leave room for one new token"
      )
