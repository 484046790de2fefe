"""Pipeline parallelism: the scanned layers split over a "stage" mesh axis, fed microbatches.

The rule table maps the stacked layers' "layers" axis to the ``stage`` mesh axis, so stage s
holds a contiguous run of layers (the same parameters, the same checkpoint, as without stages:
only their placement differs). A training forward pass then runs as a loop of
``repeats · microbatches + stages - 1`` ticks. At every tick each stage applies its layers to
the microbatch it holds, all stages at once (one ``vmap`` over the stage dimension, partitioned
over the stage axis by ``spmd_axis_name``, so data, fsdp and tensor shard each stage's work as
they shard the whole model's); then every stage's output moves to the next stage (a rotation
of the stage dimension that the compiler turns into a collective permute). Stage 0 takes a new
microbatch, or, in the circular schedule, the last stage's output of an earlier round.

Schedules:

- **GPipe** (``repeats = 1``): stage s runs layers [s·N/S, (s+1)·N/S) of the N layers on every
  microbatch. No weight moves between devices.
- **Circular** (``repeats = R > 1``): the layers are cut into R·S virtual stages of N/(R·S);
  stage s runs virtual stages s, S + s, 2S + s, ... so a microbatch goes round the ring R
  times and the bubble shrinks R-fold (each tick is 1/R of a GPipe tick). Virtual stage v's
  layers are the model's layers [v·N/(RS), (v+1)·N/(RS)), in the model's order, so that the
  checkpoint is the same as without stages; a stage's contiguous block of stored layers is
  therefore not the set it runs, and the step moves each layer's weights to the stage that
  runs it (an all-to-all of (S-1)/S of the layer weights, and of their gradients back, once per
  step). That is the price of a checkpoint layout that does not depend on the schedule.

The bubble — the fraction of stage-ticks spent on no microbatch — is (S - 1) / (R·M + S - 1)
(``bubble``). 1F1B (one forward, one backward, interleaved per stage) needs each stage to run
a different program at the same tick, which the single SPMD program of a ``vmap`` over stages
cannot express: with GPipe's schedule and rematerialised layers the activation memory it saves
is held by checkpointed layer inputs instead.

Only the training forward pass is pipelined (``Transformer._hidden``, scanned layers, no
cache); decoding runs the layers in order with the stage-split weights (the compiler gathers
them), which is correct but not fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from models import sharding


def stage_axes() -> tuple[tuple[str, ...], int]:
  """The mesh axes that split the stacked layers under the active rules, and their size S."""
  return sharding.active_axes(("layers",), 0)


def stages() -> int:
  """S: how many pipeline stages the active mesh and rules make (1: no pipeline)."""
  return stage_axes()[1]


def resolve_microbatches(microbatches: int, stages: int) -> int:
  """``pipeline.microbatches``, with -1 meaning one per stage (the fewest that keep every stage
  busy at some tick)."""
  return stages if microbatches == -1 else microbatches


def bubble(stages: int, microbatches: int, repeats: int = 1) -> float:
  """The idle fraction of the schedule's stage-ticks: (S - 1) / (R·M + S - 1)."""
  if stages <= 1:
    return 0.0
  return (stages - 1) / (repeats * microbatches + stages - 1)


def schedule(stages: int, microbatches: int, repeats: int) -> dict[str, float | int]:
  """The schedule's figures, for report.json and train.plan: stages, microbatches, repeats,
  ticks (each 1/R of a stage's layers) and the bubble."""
  m = resolve_microbatches(microbatches, stages) if stages > 1 else 1
  ticks = repeats * m + stages - 1 if stages > 1 else 1
  return {
    "stages": stages,
    "microbatches": m,
    "repeats": repeats if stages > 1 else 1,
    "ticks": ticks,
    "bubble": round(bubble(stages, m, repeats), 4),
  }


def check(num_layers: int, stages: int, microbatches: int, repeats: int) -> None:
  """Raises ValueError naming the setting that a pipeline of ``stages`` cannot run."""
  if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
    raise ValueError(f"pipeline.repeats={repeats!r} must be a positive integer (1 = GPipe)")
  integer = isinstance(microbatches, int) and not isinstance(microbatches, bool)
  if not integer or (microbatches < 1 and microbatches != -1):
    raise ValueError(
      f"pipeline.microbatches={microbatches!r} must be a positive integer, or -1 (one per stage)"
    )
  if stages <= 1:
    return
  if num_layers % (stages * repeats):
    raise ValueError(
      f"model.num_layers={num_layers} is not divisible by {stages} stages × pipeline.repeats="
      f"{repeats}; use stages × repeats dividing {num_layers}"
    )
  m = resolve_microbatches(microbatches, stages)
  # Circular: stage 0 takes microbatch j again in round q + 1 at tick (q + 1)·M + j, and the last
  # stage gives it back at q·M + j + S - 1, so M >= S. GPipe (one round) reads each once.
  if repeats > 1 and m < stages:
    raise ValueError(
      f"pipeline.microbatches={m} is fewer than the {stages} stages with pipeline.repeats="
      f"{repeats}: a microbatch must come back to stage 0 for its next round after the last "
      f"stage is done with it; use at least {stages} (or pipeline.repeats=1)"
    )


def _names(stacked: nnx.State) -> list[tuple[str | None, ...]]:
  variables = jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [tuple(v.get_metadata().get("out_sharding") or ()) for v in variables]


def _by_stage(a: jax.Array, names: tuple, stages: int, repeats: int) -> jax.Array:
  """A stacked layer parameter [N, ...] as [S, R, N/(RS), ...]: stage s's round q is virtual
  stage q·S + s (for R = 1, stage s's contiguous block of layers: its own shard)."""
  spec = sharding.active_spec(names) if names else PartitionSpec()
  spec = tuple(spec) + (None,) * (a.ndim - len(spec))
  per = a.shape[0] // (stages * repeats)
  a = a.reshape(repeats, stages, per, *a.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(a, PartitionSpec(spec[0], None, None, *spec[1:]))


def _cut(a: jax.Array, m: int) -> jax.Array:
  """[B, ...] -> [M, B/M, ...]; microbatch j holds rows j, j + M, j + 2M, ...: a data shard's
  rows stay on it."""
  return a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1)


def run(
  layer: Callable[[nnx.State, jax.Array, dict[str, jax.Array]], jax.Array],
  stacked: nnx.State,
  x_BLD: jax.Array,
  rows: dict[str, jax.Array],
  shared: dict[str, Any],
  *,
  microbatches: int,
  repeats: int,
) -> jax.Array:
  """Applies the stacked layers to ``x_BLD`` through the pipeline; returns x after all layers.

  layer(layer_state, x, inputs) applies one layer; ``inputs`` are ``rows`` (per-row arrays,
  [B, ...]: positions, segment ids, the mask) cut to the microbatch, and ``shared``.
  """
  axes, s = stage_axes()
  arrays, treedef = jax.tree.flatten(stacked)
  m, r = resolve_microbatches(microbatches, s), repeats
  check(arrays[0].shape[0], s, m, r)
  if x_BLD.shape[0] % m:
    raise ValueError(f"{x_BLD.shape[0]} rows cannot be cut into pipeline.microbatches={m}")
  weights = [_by_stage(a, names, s, r) for a, names in zip(arrays, _names(stacked), strict=True)]
  rows_M = {k: _cut(v, m) for k, v in rows.items()}
  buf_names = (None, "batch", "length", "embed")
  buf = sharding.constrain(_cut(x_BLD, m), buf_names)
  stage_names = ("layers", "batch", "length", "embed")
  held = sharding.constrain(jnp.zeros((s, *buf.shape[1:]), x_BLD.dtype), stage_names)
  index = jnp.arange(s)

  def stage_fn(w, x, micro, rnd):
    # GPipe's one round: the weights as they are, loop-invariant for the ticks' scan, whose
    # backward pass then keeps them once, not once per tick as an index by round might (on
    # the CPU a circular step's temporaries came out the same with this index rematerialised:
    # 66.6 MiB at 2 stages × 2 rounds, 8 layers of width 256; GPipe's 53.1).
    w = [a[0] if r == 1 else jax.lax.dynamic_index_in_dim(a, rnd, 0, False) for a in w]
    inputs = dict(shared)
    for k, v in rows_M.items():
      inputs[k] = jax.lax.dynamic_index_in_dim(v, micro, 0, keepdims=False)

    def body(x, layer_arrays):
      return layer(jax.tree.unflatten(treedef, layer_arrays), x, inputs), None

    return jax.lax.scan(body, x, w)[0]

  run_stages = jax.vmap(stage_fn, spmd_axis_name=axes if len(axes) > 1 else axes[0])

  def tick(carry, t):
    held, buf = carry
    shifted = jnp.concatenate([held[-1:], held[:-1]])  # stage s - 1's output to stage s
    fresh = jax.lax.dynamic_index_in_dim(buf, t % m, 0, keepdims=True)
    x = jnp.where((index == 0)[:, None, None, None], fresh, shifted)
    x = sharding.constrain(x, stage_names)
    k = t - index  # the k-th (round, microbatch) pair of each stage; outside [0, R·M): idle
    held = run_stages(weights, x, k % m, jnp.clip(k // m, 0, r - 1))
    held = sharding.constrain(held, stage_names)
    last = t - (s - 1)  # the last stage's pair: its output goes back to the buffer
    slot = last % m
    kept = jax.lax.dynamic_index_in_dim(buf, slot, 0, keepdims=False)
    # The last stage's output to every stage, as a sum over the stage dimension (a reduction
    # over the stage axis of one microbatch, sharded as the rows are): indexing the stage
    # dimension instead let TPU's partitioner replicate the whole buffer over fsdp.
    mine = jnp.where((index == s - 1)[:, None, None, None], held, jnp.zeros_like(held))
    done = sharding.constrain(jnp.sum(mine, axis=0), buf_names[1:])
    out = jnp.where(last >= 0, done, kept)
    buf = sharding.constrain(jax.lax.dynamic_update_index_in_dim(buf, out, slot, 0), buf_names)
    return (held, buf), None

  (_, buf), _ = jax.lax.scan(tick, (held, buf), jnp.arange(r * m + s - 1))
  return buf.swapaxes(0, 1).reshape(x_BLD.shape)
