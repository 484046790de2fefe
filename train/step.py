"""The pure train and eval steps: ``(state, batch) -> (state, metrics)`` over pytrees.

They know nothing of files, flags or meshes. The trainer binds the static arguments (the model's
graph definition, the optimizer, the micro-batch count) with ``functools.partial`` and jits each
step once with its shardings and donation. Called unjitted, they are ordinary functions (as in
the tests).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models.layers import dense

Batch = dict[str, jax.Array]
# The train state is a plain dict pytree: {"step": int32[], "params": {...}, "opt_state": ...,
# "data_offset": int32[] (data positions skipped by rollbacks), "loss_ema": float32[],
# "skipped_nonfinite": int32[], "skipped_spikes": int32[]}.
TrainState = dict[str, Any]


def loss_sums(
  params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, *, chunk: int = 0
) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over real tokens, and the number of real tokens."""
  ce_sum, _, weight_sum = loss_terms(params, graphdef, batch, chunk=chunk)
  return ce_sum, weight_sum


def loss_terms(
  params: nnx.State, graphdef: nnx.GraphDef, batch: Batch, *, chunk: int = 0, z: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(cross-entropy sum, sum of logsumexp², weight sum) over the batch's weighted targets.

  ``chunk`` > 0: the output projection and the cross-entropy run over ``chunk`` positions at a
  time under ``jax.checkpoint``, so the fp32 [B, L, V] logits never exist whole (the backward
  pass recomputes each chunk's logits). Same values and gradients as ``chunk=0``. The
  logsumexp² sum (for the z-loss) is computed only with ``z``; it is zero otherwise.
  """
  model = nnx.merge(graphdef, params)
  weights_BL = batch["weights"].astype(jnp.float32)
  if not chunk:
    logits_BLV = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    ce_sum, lse2_sum = _cross_entropy(logits_BLV, batch["targets"], weights_BL, z)
    return ce_sum, lse2_sum, jnp.sum(weights_BL)
  h_BLD = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])
  kernel_DV = model.output_kernel()
  b, length, d = h_BLD.shape

  def in_chunks(x):  # [B, L, ...] -> [L / chunk, B, chunk, ...]
    return jnp.swapaxes(x.reshape(b, length // chunk, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def one(h_BCD, targets_BC, weights_BC):
    logits_BCV = dense(h_BCD, kernel_DV, preferred_element_type=jnp.float32)
    return _cross_entropy(logits_BCV, targets_BC, weights_BC, z)

  def body(carry, chunk_inputs):
    ce, lse2 = one(*chunk_inputs)
    return (carry[0] + ce, carry[1] + lse2), None

  zero = jnp.zeros((), jnp.float32)
  xs = (in_chunks(h_BLD), in_chunks(batch["targets"]), in_chunks(weights_BL))
  (ce_sum, lse2_sum), _ = jax.lax.scan(body, (zero, zero), xs)
  return ce_sum, lse2_sum, jnp.sum(weights_BL)


def _cross_entropy(logits_BLV, targets_BL, weights_BL, z: bool) -> tuple[jax.Array, jax.Array]:
  """Weighted sums of -log p(target) and (with ``z``) of logsumexp², the z-loss term."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  losses_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL)
  lse2 = jnp.zeros((), jnp.float32)
  if z:
    lse2 = jnp.sum(jnp.square(jax.nn.logsumexp(logits_BLV, axis=-1)) * weights_BL)
  return jnp.sum(losses_BL * weights_BL), lse2


def _objective(params, graphdef, batch: Batch, chunk: int, z_loss: float):
  """What the gradient is of: cross-entropy plus z_loss × logsumexp² (PaLM's z-loss)."""
  ce_sum, lse2_sum, weight_sum = loss_terms(params, graphdef, batch, chunk=chunk, z=z_loss > 0)
  return ce_sum + z_loss * lse2_sum, (ce_sum, weight_sum)


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
  """[B, L] -> [k, B/k, L]; micro-batch j holds rows j, j+k, ...: every device keeps its rows."""

  def split(x):
    rows = x.shape[0]
    return jnp.swapaxes(x.reshape(rows // microbatches, microbatches, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def gradients(params, graphdef, batch: Batch, microbatches: int, chunk: int = 0, z_loss=0.0):
  """Gradient of the mean token loss over the whole batch, accumulated over micro-batches.

  Sums (not means) are accumulated and divided by the total token count once at the end, so k
  micro-batches give the same update as one full batch, up to float summation order. Returns
  the mean cross-entropy (z-loss excluded), the token count and the gradients.
  """
  grad_fn = jax.value_and_grad(_objective, has_aux=True)
  if microbatches == 1:
    (_, (loss_sum, weight_sum)), grad_sums = grad_fn(params, graphdef, batch, chunk, z_loss)
  else:

    def accumulate(carry, micro):
      (_, (loss_sum, weight_sum)), grads = grad_fn(params, graphdef, micro, chunk, z_loss)
      acc_loss, acc_weight, acc_grads = carry
      return (
        acc_loss + loss_sum,
        acc_weight + weight_sum,
        jax.tree.map(jnp.add, acc_grads, grads),
      ), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, weight_sum, grad_sums), _ = jax.lax.scan(
      accumulate, init, _split_microbatches(batch, microbatches)
    )
  denominator = jnp.maximum(weight_sum, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grad_sums)
  return loss_sum / denominator, weight_sum, grads


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  microbatches: int = 1,
  spike_factor: float = 0.0,
  frozen: Any = None,
  loss_chunk: int = 0,
  z_loss: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on one global batch.

  A step whose loss or gradients are not finite never reaches the parameters or the optimizer
  state: it is skipped and counted. With ``spike_factor > 0`` a loss above ``spike_factor`` × the
  running mean of accepted losses is skipped too (a loss spike). The data position still advances.
  """
  params_in = state["params"]
  if frozen is not None:  # LoRA: no gradient flows into (or is computed for) frozen weights
    params_in = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params_in, frozen)
  loss, tokens, grads = gradients(params_in, graphdef, batch, microbatches, loss_chunk, z_loss)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  ema = state["loss_ema"]
  spike = (spike_factor > 0) & (ema > 0) & (loss > spike_factor * ema)
  accept = finite & ~spike
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # The learning rate this step applies: the schedule at the optimizer's own count, which skipped
  # steps do not advance; 0 when this step is skipped.
  counts = optax.tree_utils.tree_get_all_with_path(state["opt_state"], "count")
  applied_count = counts[0][1] if counts else state["step"]

  def choose(new, old):
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)

  new_state = {
    "step": state["step"] + 1,
    "data_offset": state["data_offset"],
    "params": choose(params, state["params"]),
    "opt_state": choose(opt_state, state["opt_state"]),
    # Running mean of accepted losses over ~10 steps (the first accepted loss starts it).
    "loss_ema": jnp.where(accept, jnp.where(ema > 0, 0.9 * ema + 0.1 * loss, loss), ema),
    "skipped_nonfinite": state["skipped_nonfinite"] + (~finite).astype(jnp.int32),
    "skipped_spikes": state["skipped_spikes"] + (finite & spike).astype(jnp.int32),
  }
  metrics = {
    "train/loss": loss,
    "train/grad_norm": grad_norm,
    "train/param_norm": optax.tree.norm(new_state["params"]),
    "train/learning_rate": jnp.where(accept, schedule(applied_count), 0.0),
    "train/tokens": tokens,
    "train/skipped": (~accept).astype(jnp.int32),
    "train/spike": spike.astype(jnp.int32),
    "train/skipped_nonfinite_total": new_state["skipped_nonfinite"],
    "train/skipped_spikes_total": new_state["skipped_spikes"],
  }
  metrics.update(layer_norms("grad_norm", grads))
  metrics.update(layer_norms("update_norm", updates, scale=accept.astype(jnp.float32)))
  return new_state, metrics


def layer_norms(prefix: str, tree: Any, scale: jax.Array | float = 1.0) -> dict[str, jax.Array]:
  """L2 norms per layer (``<prefix>/layer_<i>``) and per other top-level part (``embed``,
  ``final_norm``, ...). Layers are ``blocks/<i>`` (unrolled) or the leading axis of ``blocks``
  (scanned): the same names either way."""
  squares: dict[str, jax.Array] = {}

  def add(name: str, value: jax.Array) -> None:
    squares[name] = squares.get(name, 0.0) + value

  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    leaf = leaf.astype(jnp.float32)
    if keys[0] != "blocks":
      add(keys[0], jnp.sum(jnp.square(leaf)))
    elif keys[1].isdigit():
      add(f"layer_{keys[1]}", jnp.sum(jnp.square(leaf)))
    else:  # stacked on a leading layers axis
      per_layer = jnp.sum(jnp.square(leaf), axis=tuple(range(1, leaf.ndim)))
      for i in range(leaf.shape[0]):
        add(f"layer_{i}", per_layer[i])
  return {f"{prefix}/{name}": jnp.sqrt(value) * scale for name, value in sorted(squares.items())}


def eval_step(
  params: nnx.State, batch: Batch, *, graphdef: nnx.GraphDef, loss_chunk: int = 0
) -> dict[str, jax.Array]:
  """Summed loss and token count of one eval batch (the caller sums over the eval set)."""
  loss_sum, weight_sum = loss_sums(params, graphdef, batch, chunk=loss_chunk)
  return {"loss_sum": loss_sum, "tokens": weight_sum}


# --- health on the device: the loop fetches it on log steps only --------------------------------

HEALTH_RING = 16  # skipped steps remembered between two fetches (more are counted, not listed)


def init_health() -> dict[str, jax.Array]:
  """Skip records kept on the device between fetches: ``count`` skips so far, the last
  HEALTH_RING of them in a ring (step, spike or not, loss, grad norm, skips in a row)."""
  ring = (HEALTH_RING,)
  return {
    "count": jnp.zeros((), jnp.int32),
    "consecutive": jnp.zeros((), jnp.int32),
    "step": jnp.zeros(ring, jnp.int32),
    "spike": jnp.zeros(ring, jnp.int32),
    "loss": jnp.zeros(ring, jnp.float32),
    "grad_norm": jnp.zeros(ring, jnp.float32),
    "in_a_row": jnp.zeros(ring, jnp.int32),
  }


def track_health(
  health: dict[str, jax.Array], metrics: dict[str, jax.Array], step_number: jax.Array
) -> dict[str, jax.Array]:
  """Adds one step's outcome to ``health`` (a few scalars: no host round trip per step)."""
  skipped = metrics["train/skipped"] > 0
  consecutive = jnp.where(skipped, health["consecutive"] + 1, 0)
  slot = health["count"] % HEALTH_RING

  def put(ring, value):
    return ring.at[slot].set(jnp.where(skipped, value.astype(ring.dtype), ring[slot]))

  return {
    "count": health["count"] + skipped.astype(jnp.int32),
    "consecutive": consecutive,
    "step": put(health["step"], step_number),
    "spike": put(health["spike"], metrics["train/spike"]),
    "loss": put(health["loss"], metrics["train/loss"]),
    "grad_norm": put(health["grad_norm"], metrics["train/grad_norm"]),
    "in_a_row": put(health["in_a_row"], consecutive),
  }
