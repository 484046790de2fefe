"""The compiled prefill/decode engine with a KV cache on the training mesh, and the trainer's
eval-time sample.

How a batch of prompts of different lengths stays exact. ``Transformer.decode`` writes every row at
the same cache slot, so rows cannot be padded to a common length without attending to the padding.
Instead all rows walk the slots together from slot 0: the prompt's first ``m - 1`` tokens (``m`` =
the shortest prompt) are prefilled, in chunks whose lengths are powers of two (each chunk length is
compiled once), then one compiled decode step runs per slot. At slot ``s`` a row whose prompt is
longer than ``s + 1`` is fed its own prompt token (teacher forcing); the others are fed the token
just sampled. No row ever sees a padding token, so each row gets the tokens it would get alone.

Sampling (``train/sampling.py``): row ``i`` draws with the key
``fold_in(fold_in(key(seed), i), slot)``: reproducible for a seed, independent of the batch size.
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
from jax.sharding import NamedSharding

import models
from models.config import ModelConfig
from train import mesh as mesh_lib
from train.sampling import Sampling, sample

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
):
  """Feeds the token at slot ``index``; returns the cache, the token for slot index + 1 and the
  logits it was chosen from (the prompt's own token while a row is still inside its prompt)."""
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
  return cache, jnp.where(slot < lengths_B, prompt_token_B, sampled_B), logits_BV


def chunk_lengths(tokens: int) -> list[int]:
  """Powers of two summing to ``tokens``, largest first: the prefill chunks (13 -> [8, 4, 1])."""
  return [1 << bit for bit in reversed(range(tokens.bit_length())) if tokens >> bit & 1]


@dataclasses.dataclass
class Generation:
  """What one ``Engine.run`` produced: token ids per prompt, why each stopped, and timings."""

  tokens: list[list[int]]  # generated ids per prompt (the end-of-document id not included)
  stop_reasons: list[str]  # "eod" | "max_new_tokens" | "context"
  logits: list[np.ndarray] | None  # per prompt [generated, V] when record_logits, else None
  compile_seconds: float
  prefill_tokens: int
  time_to_first_token_s: float
  decode_seconds: float
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
    self._rows_2d = self._named(("batch", "length"))
    self._replicated = mesh_lib.replicated(mesh)
    self._compiled: dict[tuple, Any] = {}
    self.compile_seconds = 0.0

  def _named(self, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(self.mesh, mesh_lib.logical_to_spec(names, self.rules))

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
  ) -> Generation:
    """Generates up to ``max_new_tokens`` after each prompt (token ids); see the module docstring.

    on_token(row, token_id) is called as each generated token reaches the host.
    """
    context = self.model_cfg.max_seq_len
    check_prompts(prompts, context)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    lengths = [len(p) for p in prompts]
    new = [min(max_new_tokens, context - n) for n in lengths]  # the context bounds each row
    rows = len(prompts)
    batch = -(-rows // self.data_parallel) * self.data_parallel
    last_slot = max(n + k for n, k in zip(lengths, new, strict=True)) - 1
    cache_len = min(context, -(-last_slot // CACHE_BUCKET) * CACHE_BUCKET)
    shortest = min(lengths)

    # Rows past the prompts repeat prompt 0: the mesh needs the batch divisible by its size.
    padded = [list(p) for p in prompts] + [list(prompts[0])] * (batch - rows)
    prompts_BS = np.zeros((batch, cache_len), np.int32)
    for i, p in enumerate(padded):
      prompts_BS[i, : min(len(p), cache_len)] = p[:cache_len]
    lengths_B = np.asarray([len(p) for p in padded], np.int32)
    base = jax.random.key(seed)
    keys_B = np.asarray(
      jax.random.key_data(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(batch)))
    )

    graphdef = self.graphdef
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    init_cache = functools.partial(_init_cache, graphdef=graphdef, batch=batch, length=cache_len)
    make_cache = self._compile(
      ("cache", batch, cache_len), init_cache, (params,), (param_shardings,), self.cache_sharding
    )
    cache_abstract = jax.eval_shape(init_cache, params)
    step_fn = self._compile(
      ("step", batch, cache_len, sampling),
      functools.partial(_decode_step, graphdef=graphdef, sampling=sampling),
      (params, cache_abstract, prompts_BS, lengths_B, lengths_B, np.int32(0), keys_B),
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
      (self.cache_sharding, self._replicated, self._named(("batch", "vocab"))),
      donate=(1,),
    )
    chunks = chunk_lengths(shortest - 1)
    prefill_fns = [
      self._compile(
        ("prefill", batch, cache_len, length),
        functools.partial(_prefill, graphdef=graphdef),
        (params, cache_abstract, np.zeros((batch, length), np.int32), np.int32(0)),
        (param_shardings, self.cache_sharding, self._rows_2d, self._replicated),
        self.cache_sharding,
        donate=(1,),
      )
      for length in chunks
    ]

    prompts_dev = self._put(prompts_BS, self._rows_2d)
    lengths_dev = self._put(lengths_B, self._rows)
    keys_dev = self._put(keys_B, self._named(("batch", None)))
    # XLA:CPU collectives can deadlock with many multi-device steps in flight (NOTES.md).
    sync_each_step = jax.devices()[0].platform == "cpu" and jax.device_count() > 1

    start = time.perf_counter()
    cache = make_cache(params)
    offset = 0
    for length, prefill in zip(chunks, prefill_fns, strict=True):
      chunk = self._put(
        np.ascontiguousarray(prompts_BS[:, offset : offset + length]), self._rows_2d
      )
      cache = prefill(params, cache, chunk, np.int32(offset))
      offset += length
    token = self._put(prompts_BS[:, shortest - 1], self._replicated)

    generated: list[list[int]] = [[] for _ in range(rows)]
    recorded: list[list[np.ndarray]] = [[] for _ in range(rows)]
    reasons = [""] * rows
    first_token_at = None
    index, steps = shortest - 1, 0
    pending = None
    while True:
      if index < last_slot:
        cache, token, logits = step_fn(
          params, cache, prompts_dev, lengths_dev, token, np.int32(index), keys_dev
        )
        index, steps = index + 1, steps + 1
        current = (index, token, logits)
        if sync_each_step:
          token.block_until_ready()
      else:
        current = None
      if pending is not None:
        slot, token_host, logits_dev = pending
        token_host = np.asarray(token_host)
        logits_host = np.asarray(logits_dev) if record_logits else None
        for row in range(rows):
          if reasons[row] or slot < lengths[row]:
            continue
          if first_token_at is None:
            first_token_at = time.perf_counter()
          tok = int(token_host[row])
          if logits_host is not None:
            recorded[row].append(logits_host[row])
          if eod_id is not None and tok == eod_id:
            reasons[row] = "eod"
            continue
          generated[row].append(tok)
          if on_token is not None:
            on_token(row, tok)
          if len(generated[row]) == new[row]:
            reasons[row] = "max_new_tokens" if new[row] == max_new_tokens else "context"
        if all(reasons):
          break
      if current is None and pending is None:
        break
      pending = current
    end = time.perf_counter()
    first_token_at = first_token_at or end
    for row in range(rows):
      reasons[row] = reasons[row] or "context"

    # Bytes every device reads per step, summed: all weights and the whole cache (masked slots
    # included), shard by shard, so replicated copies count once per device that holds one.
    read_bytes = jax.process_count() * sum(
      shard.data.nbytes for x in jax.tree.leaves((params, cache)) for shard in x.addressable_shards
    )
    contexts = [lengths[r] + t for r in range(rows) for t in range(len(generated[r]))]
    return Generation(
      tokens=generated,
      stop_reasons=reasons,
      logits=[np.stack(r) if r else np.zeros((0,)) for r in recorded] if record_logits else None,
      compile_seconds=self.compile_seconds,
      prefill_tokens=rows * shortest,
      time_to_first_token_s=first_token_at - start,
      decode_seconds=end - first_token_at,
      decode_steps=steps,
      bytes_per_decode_step=read_bytes,
      mean_context=statistics.fmean(contexts) if contexts else float(shortest),
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


# --- the trainer's eval-time sample ---


@functools.lru_cache(maxsize=4)
def _eval_engine(
  graphdef: nnx.GraphDef, model_cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: mesh_lib.Rules
) -> Engine:
  return Engine(graphdef, model_cfg, mesh, rules)


def sample_for_eval(run: Any, params: Any) -> str | None:
  """A short greedy continuation of ``log.sample_prompt`` (None when ``log.sample_tokens`` is 0).

  For the trainer at each eval: ``run`` is its ``trainer.Run``, ``params`` the state's params.
  The compiled steps are kept between evals. Every process must call it (the steps are global).
  """
  tokens = int(run.config.log.sample_tokens)
  if tokens <= 0:
    return None
  tokenizer = run.pipeline.tokenizer
  prompt = tokenizer.encode(run.config.log.sample_prompt)
  engine = _eval_engine(run.spec.graphdef, run.model_cfg, run.mesh, run.rules)
  out = engine.run(
    params,
    [prompt],
    max_new_tokens=tokens,
    sampling=Sampling(temperature=0.0),
    seed=run.config.seed,
    eod_id=tokenizer.eod_id,
  )
  return run.config.log.sample_prompt + tokenizer.decode(out.tokens[0])
