"""Sampling from a trained checkpoint with a KV cache, on the training mesh, metered.

``python -m train.generate --workdir DIR --prompt TEXT [--prompt TEXT ...] [--prompts_file F]
[--step N] [--max_new_tokens 128] [--temperature 1.0 | --greedy] [--top_k 0] [--top_p 1.0]
[--seed 0] [--json]``

Library (Colab)::

  from train import generate
  model = generate.load("/content/run")              # latest checkpoint, sharded on this mesh
  result = generate.generate(model, ["def ", "class "], max_new_tokens=64, temperature=0.8)
  result.texts, result.stats

How a batch of prompts of different lengths stays exact. ``Transformer.decode`` writes every row at
the same cache slot, so rows cannot be padded to a common length without attending to the padding.
Instead all rows walk the slots together from slot 0: the prompt's first ``m - 1`` tokens (``m`` =
the shortest prompt) are prefilled, in chunks whose lengths are powers of two (each chunk length is
compiled once), then one compiled decode step runs per slot. At slot ``s`` a row whose prompt is
longer than ``s + 1`` is fed its own prompt token (teacher forcing); the others are fed the token
just sampled. No row ever sees a padding token, so each row gets the tokens it would get alone.

Sampling: temperature (0 = greedy), then top-k, then top-p (nucleus). Row ``i`` draws with the key
``fold_in(fold_in(key(seed), i), slot)``: reproducible for a seed, independent of the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding

import input_pipeline
import models
from models.config import ModelConfig
from train import energy, flops
from train import mesh as mesh_lib
from train import state as state_lib

log = logging.getLogger("loom")

CACHE_BUCKET = 64  # cache lengths are rounded up to a multiple of this (fewer recompiles)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)):
      raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} is negative; use 0 (greedy) or more")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
    if not (0.0 < self.top_p <= 1.0):
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def filter_logits(logits_BV: jax.Array, sampling: Sampling) -> jax.Array:
  """Tempered logits with everything outside the top-k and the top-p nucleus set to -inf.

  Tokens tied with the last one kept are kept too, so a set may exceed k (or the nucleus) on ties.
  """
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  if 0 < sampling.top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1.0:
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token if the mass before it is below top_p: the smallest set reaching top_p.
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < sampling.top_p
    last_B1 = jnp.sum(keep_BV, axis=-1, keepdims=True) - 1
    threshold_B1 = jnp.take_along_axis(sorted_BV, last_B1, axis=-1)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample(logits_BV: jax.Array, keys_B: jax.Array, sampling: Sampling) -> jax.Array:
  """int32[B] next tokens; keys_B holds one typed PRNG key per row."""
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered_BV = filter_logits(logits_BV, sampling)
  return jax.vmap(jax.random.categorical)(keys_B, filtered_BV).astype(jnp.int32)


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


# --- loading a checkpoint ---


@dataclasses.dataclass
class Model:
  """A restored model ready to sample from: params on the mesh, the tokenizer of its run."""

  params: Any
  graphdef: nnx.GraphDef
  model_cfg: ModelConfig
  tokenizer: Any
  mesh: jax.sharding.Mesh
  rules: mesh_lib.Rules
  step: int
  config: ml_collections.ConfigDict
  engine: Engine


def checkpoint_steps(workdir: str) -> tuple[ocp.CheckpointManager, list[int]]:
  """A read-only view of ``workdir/checkpoints`` and its complete steps (error if none)."""
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"--workdir {workdir} has no checkpoints ({directory} does not exist); train first with "
      f"python -m train --workdir {workdir}"
    )
  # Read-only: generation must never create, clean up or delete anything in a run's directory.
  manager = ocp.CheckpointManager(
    directory,
    item_names=("state", "metadata"),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"--workdir {workdir} has no complete checkpoint in {directory}")
  return manager, steps


def load(workdir: str, step: int | None = None, *, mesh_config: Any = None) -> Model:
  """Restores the params (only) of ``step`` (default: the latest) sharded on this host's mesh.

  The mesh comes from the run's saved config unless ``mesh_config`` is given; if the saved sizes
  do not fit the devices here, all devices go to fsdp. The tokenizer is rebuilt from the saved
  config (``input_pipeline.build``) and must match the run's data fingerprint.
  """
  manager, steps = checkpoint_steps(workdir)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"--step {step} has no checkpoint in {workdir}; available steps: {steps}")
  metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  metadata = metadata["metadata"]
  config = ml_collections.ConfigDict(metadata["config"])
  model_cfg = ModelConfig(**metadata["model_config"])

  pipeline = input_pipeline.build(config)
  if pipeline.fingerprint != metadata["data_fingerprint"]:
    raise ValueError(
      f"the tokenizer rebuilt from {workdir}'s config has data fingerprint "
      f"{pipeline.fingerprint[:16]}, the checkpoint {metadata['data_fingerprint'][:16]}: the data "
      f"or tokenizer under data.cache_dir={config.data.cache_dir} changed since training"
    )
  mesh, rules = _mesh_for(config.mesh if mesh_config is None else mesh_config)
  # Only the params are restored: the optimizer's shape is irrelevant, identity has no state.
  spec = state_lib.state_spec(model_cfg, optax.identity(), mesh, rules, seed=config.seed)
  abstract = {"params": spec.abstract["params"]}
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
      )
    ),
  )
  manager.close()
  engine = Engine(spec.graphdef, model_cfg, mesh, rules)
  return Model(
    restored["state"]["params"],
    spec.graphdef,
    model_cfg,
    pipeline.tokenizer,
    mesh,
    rules,
    step,
    config,
    engine,
  )


def _mesh_for(mesh_config: Any) -> tuple[jax.sharding.Mesh, mesh_lib.Rules]:
  rules = mesh_lib.logical_rules(mesh_config)
  try:
    return mesh_lib.make_mesh(mesh_config), rules
  except ValueError as e:
    log.warning("the run's mesh does not fit here (%s); using fsdp over all devices", e)
    fallback = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return mesh_lib.make_mesh(fallback), rules


# --- the library entry point and its meter ---


@dataclasses.dataclass
class Result:
  texts: list[str]
  tokens: list[list[int]]
  stop_reasons: list[str]
  stats: dict[str, Any]  # the inference meter (see inference_stats)
  logits: list[np.ndarray] | None = None  # per prompt [generated, V], when record_logits


def measure_copy_bandwidth(
  device: jax.Device | None = None, *, megabytes: int | None = None, repeats: int = 5
) -> float:
  """Median bytes/s of an in-place elementwise update (read + write) on one device, measured now.

  The input is donated so each repetition reuses one buffer: a fresh output would measure page
  faults, not memory (1 GB/s instead of 11-15 GB/s on a 2-core CPU). The array is larger than any
  cache: 256 MiB on CPUs, 1 GiB on accelerators.
  """
  device = device or jax.local_devices()[0]
  megabytes = megabytes or (256 if device.platform == "cpu" else 1024)
  x = jax.device_put(jnp.zeros((megabytes * (1 << 20) // 4,), jnp.float32), device)
  nbytes = x.nbytes
  update = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  x = update(x).block_until_ready()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    x = update(x).block_until_ready()
    times.append(time.perf_counter() - start)
  del x
  return 2 * nbytes / statistics.median(times)


def generate(
  model: Model,
  prompts: Sequence[str],
  *,
  max_new_tokens: int = 128,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stream: Callable[[int, str], None] | None = None,
  record_logits: bool = False,
  measure_bandwidth: bool = True,
) -> Result:
  """Samples continuations of ``prompts`` (strings); returns texts and the inference meter.

  stream(row, text) receives each row's new text as its tokens arrive (held back while a
  multi-byte character is incomplete).
  """
  sampling = Sampling(temperature, top_k, top_p)
  tokenizer = model.tokenizer
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f"prompt {i} is empty; give at least one character")
  ids = [tokenizer.encode(p) for p in prompts]
  printer = _StreamDecoder(tokenizer, len(prompts), stream) if stream else None
  span = energy.EnergySpan.start()
  out = model.engine.run(
    model.params,
    ids,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    seed=seed,
    eod_id=tokenizer.eod_id,
    on_token=printer.add if printer else None,
    record_logits=record_logits,
  )
  measured = span.measured_joules()
  if printer:
    printer.flush()
  stats = inference_stats(
    model,
    out,
    prompt_tokens=sum(map(len, ids)),
    measured_joules=measured,
    measured_by=span.counter.source if span.counter else "",
    measure_bandwidth=measure_bandwidth,
  )
  texts = [tokenizer.decode(t) for t in out.tokens]
  return Result(texts, out.tokens, out.stop_reasons, stats, out.logits)


def inference_stats(
  model: Model,
  out: Generation,
  *,
  prompt_tokens: int,
  measured_joules: float | None,
  measured_by: str,
  measure_bandwidth: bool,
) -> dict[str, Any]:
  """Prefill/decode throughput, time to first token, FLOPs, bandwidth use and energy per 1k."""
  cfg, meter = model.model_cfg, model.config.meter
  generated = sum(map(len, out.tokens))
  devices = list(model.mesh.devices.flat)
  step_time = out.decode_seconds / max(out.decode_steps - 1, 1)
  bandwidth = None
  if measure_bandwidth:
    bandwidth = measure_copy_bandwidth()
    if devices[0].platform != "cpu":
      bandwidth *= len(devices)  # fake CPU devices share one machine's memory: count it once
  seconds = out.time_to_first_token_s + out.decode_seconds
  power = energy.energy_figures(
    seconds=seconds,
    devices=devices,
    pue=meter.pue,
    grid_kg_per_kwh=meter.grid_kg_per_kwh,
    power_override=meter.power_watts,
    measured_joules=measured_joules,
    measured_by=measured_by,
  )
  per_1k = power["energy_kwh"] * 1000 / generated if generated else None
  return {
    "step": model.step,
    "prompt_tokens": prompt_tokens,
    "generated_tokens": generated,
    "compile_time_s": out.compile_seconds,
    "prefill_tokens_per_second": out.prefill_tokens / max(out.time_to_first_token_s, 1e-9),
    "time_to_first_token_s": out.time_to_first_token_s,
    "decode_tokens_per_second": generated / out.decode_seconds if out.decode_seconds else None,
    "decode_step_time_s": step_time,
    "flops_per_generated_token": flops.forward_flops_per_token(cfg, round(out.mean_context)),
    "bytes_per_decode_step": out.bytes_per_decode_step,
    "copy_bandwidth_bytes_per_second": bandwidth,
    "bandwidth_utilisation": (
      out.bytes_per_decode_step / step_time / bandwidth if bandwidth else None
    ),
    "energy_kwh": power["energy_kwh"],
    "energy_kwh_per_1k_tokens": per_1k,
    "co2e_kg": power["co2e_kg"],
    "energy_source": power["energy_source"],
    "assumptions": {
      "prefill": "prompt tokens up to the first generated token (shortest prompt × rows) / time "
      "to first token; longer prompts' remaining tokens run as decode steps",
      "flops": f"2*(N_nonembedding + d_model*vocab) + 4*layers*heads*head_dim*context at the mean "
      f"context {out.mean_context:.0f} (train/flops.py forward_flops_per_token)",
      "bandwidth": "(all weights + the whole KV cache) read per decode step / median step time, "
      "against a jitted elementwise copy measured in this process",
      "energy_method": power["energy_method"],
      "pue": meter.pue,
      "grid_kg_co2e_per_kwh": meter.grid_kg_per_kwh,
    },
  }


class _StreamDecoder:
  """Turns token ids into text deltas per row, holding back incomplete UTF-8 sequences."""

  def __init__(self, tokenizer, rows: int, emit: Callable[[int, str], None]):
    self.tokenizer, self.emit = tokenizer, emit
    self.ids: list[list[int]] = [[] for _ in range(rows)]
    self.shown = [0] * rows

  def add(self, row: int, token: int) -> None:
    self.ids[row].append(token)
    text = self.tokenizer.decode(self.ids[row])
    if not text.endswith("\ufffd"):
      self._show(row, text)

  def flush(self) -> None:
    for row, ids in enumerate(self.ids):
      self._show(row, self.tokenizer.decode(ids))

  def _show(self, row: int, text: str) -> None:
    if len(text) > self.shown[row]:
      self.emit(row, text[self.shown[row] :])
      self.shown[row] = len(text)


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


# --- the command line ---


def _read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
  texts = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise FileNotFoundError(f"--prompts_file {prompts_file}: no such file")
    with open(prompts_file, encoding="utf-8") as f:
      texts += [line.rstrip("\n") for line in f if line.strip()]
  if not texts:
    raise ValueError("no prompts given; pass --prompt TEXT (repeatable) or --prompts_file FILE")
  return texts


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from absl import logging as absl_logging

  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax/TFDS chatter would bury the text
  code = 0
  try:
    prompts = _read_prompts(f.prompt or [], f.prompts_file)
    sampling = Sampling(0.0 if f.greedy else f.temperature, f.top_k, f.top_p)
    model = load(f.workdir, f.step)
    single = len(prompts) == 1

    def stream(row: int, text: str) -> None:
      print(text, end="", flush=True)

    if single and not f.json:
      print(prompts[0], end="", flush=True)
    result = generate(
      model,
      prompts,
      max_new_tokens=f.max_new_tokens,
      temperature=sampling.temperature,
      top_k=sampling.top_k,
      top_p=sampling.top_p,
      seed=f.seed,
      stream=stream if single and not f.json else None,
    )
    if single and not f.json:
      print()
    elif not f.json:
      for prompt, text in zip(prompts, result.texts, strict=True):
        print(f"--- {prompt!r}\n{prompt}{text}\n")
    stats = result.stats
    if f.json:
      print(
        json.dumps(
          {"texts": result.texts, "prompts": prompts, "stop_reasons": result.stop_reasons, **stats}
        )
      )
    else:
      print(_summary(stats), file=sys.stderr)
  except (ValueError, FileNotFoundError) as e:
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    code = 2
  sys.exit(code)


def _summary(stats: dict[str, Any]) -> str:
  decode = stats["decode_tokens_per_second"]
  util = stats["bandwidth_utilisation"]
  per_1k = stats["energy_kwh_per_1k_tokens"]
  return (
    f"[step {stats['step']}] prefill {stats['prefill_tokens_per_second']:,.0f} tok/s, first "
    f"token {stats['time_to_first_token_s'] * 1e3:.1f} ms, decode "
    f"{'n/a' if decode is None else f'{decode:,.1f}'} tok/s (measured), "
    f"{stats['flops_per_generated_token']:,} FLOPs/token (estimated), bandwidth "
    f"{'n/a' if util is None else f'{util:.1%}'} of measured copy, "
    f"{'n/a' if per_1k is None else f'{per_1k:.3g}'} kWh per 1k tokens ({stats['energy_source']})"
  )


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.", required=True)
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for a batch).")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0 = greedy).")
  flags.DEFINE_boolean("greedy", False, "Always take the most likely token (temperature 0).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", 1.0, "Sample within the nucleus of this probability mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_boolean("json", False, "Print one JSON object last (texts and the meter).")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
