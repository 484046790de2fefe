"""The pure train and eval steps: ``(state, batch) -> (state, metrics)`` over pytrees.

The loss they differentiate is ``train/loss.py``'s, the per-layer norms they report
``train/health.py``'s. They know nothing of files, flags or meshes. The trainer binds the static
arguments (the model's graph definition, the optimizer, the micro-batch count) with
``functools.partial`` and jits each step once with its shardings and donation. Called unjitted,
they are ordinary functions (as in the tests).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from models import moe as moe_lib
from models.config import MoEConfig
from train import dpo, grpo, health
from train import loss as loss_lib
from train.loss import Batch

# The train state is a plain dict pytree: {"step": int32[], "params": {...}, "opt_state": ...,
# "data_offset": int32[] (data positions skipped by rollbacks), "loss_ema": float32[],
# "skipped_nonfinite": int32[], "skipped_spikes": int32[]}, and for DPO (or GRPO with a KL term)
# without LoRA "reference": the frozen starting parameters.
TrainState = dict[str, Any]


def _split_microbatches(batch: Batch, microbatches: int) -> Batch:
  """[B, L] -> [k, B/k, L]; micro-batch j holds rows j, j+k, ...: every device keeps its rows."""

  def split(x):
    rows = x.shape[0]
    return jnp.swapaxes(x.reshape(rows // microbatches, microbatches, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def gradients(
  params, graphdef, batch: Batch, microbatches: int, chunk: int = 0, z_loss=0.0, objective=None
):
  """Gradient of the mean loss over the whole batch, accumulated over micro-batches.

  ``objective`` (default ``train/loss.py``'s token cross-entropy; ``train/dpo.py``'s for pairs,
  ``train/grpo.py``'s for rollouts) returns sums and the count they are means over (tokens, or
  pairs); a metric whose name ends in ``_max`` is a maximum instead, kept as one. Sums (not
  means) are accumulated and divided by the batch's total count once at the end, so k
  micro-batches give the same update as one full batch, up to float summation order. Returns
  the mean loss (z-loss excluded), the count, the gradients, an MoE model's router statistics
  (means over micro-batches; {} when dense) and the objective's metrics (means over the count;
  {} for LM).
  """
  grad_fn = jax.value_and_grad(objective or loss_lib.objective, has_aux=True)
  if microbatches == 1:
    (_, aux), grad_sums = grad_fn(params, graphdef, batch, chunk, z_loss)
    loss_sum, weight_sum, stats, sums = aux
  else:
    micros = _split_microbatches(batch, microbatches)

    def accumulate(carry, micro):
      (_, (loss_sum, weight_sum, stats, sums)), grads = grad_fn(
        params, graphdef, micro, chunk, z_loss
      )
      acc_loss, acc_weight, acc_stats, acc_sums, acc_grads = carry
      return (
        acc_loss + loss_sum,
        acc_weight + weight_sum,
        jax.tree.map(lambda a, x: a + x / microbatches, acc_stats, stats),
        {name: _combine(name)(acc_sums[name], value) for name, value in sums.items()},
        jax.tree.map(jnp.add, acc_grads, grads),
      ), None

    first = jax.tree.map(lambda x: x[0], micros)
    aux_shape = jax.eval_shape(lambda: grad_fn(params, graphdef, first, chunk, z_loss)[0][1])
    zero = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)
    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (*zero(aux_shape), zeros)
    (loss_sum, weight_sum, stats, sums, grad_sums), _ = jax.lax.scan(accumulate, init, micros)
  denominator = jnp.maximum(weight_sum, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grad_sums)
  means = {
    name: value if name.endswith("_max") else value / denominator for name, value in sums.items()
  }
  return loss_sum / denominator, weight_sum, grads, stats, means


def _combine(name: str):
  """How a metric of two micro-batches combines: a maximum (``*_max``) or a sum."""
  return jnp.maximum if name.endswith("_max") else jnp.add


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
  moe: MoEConfig | None = None,
  preference: dpo.Preference | None = None,
  policy: grpo.Settings | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on one global batch.

  A step whose loss or gradients are not finite never reaches the parameters or the optimizer
  state: it is skipped and counted. With ``spike_factor > 0`` a loss above ``spike_factor`` × the
  running mean of accepted losses is skipped too (a loss spike). The data position still advances.

  ``preference`` (``train.objective = "dpo"``): the loss is ``train/dpo.py``'s over the batch's
  pairs. Its reference model is the frozen starting weights: with LoRA the same parameters with
  the adapters switched off, otherwise ``state["reference"]``, a copy sharded like the policy
  (``train/state.py``) that this step passes through unchanged.

  ``policy`` (``train.objective = "grpo"``): the loss is ``train/grpo.py``'s over a rollout
  batch's completion tokens, its KL term against the same reference as DPO's.
  """
  params_in = state["params"]
  if frozen is not None:  # LoRA: no gradient flows into (or is computed for) frozen weights
    params_in = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params_in, frozen)
  objective = None
  for settings, module in ((preference, dpo), (policy, grpo)):
    if settings is not None:
      reference = None
      if settings.uses_reference:
        reference = dpo.adapters_off(params_in) if frozen is not None else state["reference"]
      objective = functools.partial(module.objective, reference=reference, settings=settings)
  loss, count, grads, moe_stats, means = gradients(
    params_in, graphdef, batch, microbatches, loss_chunk, z_loss, objective
  )
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  ema = state["loss_ema"]
  spike = (spike_factor > 0) & (ema > 0) & (loss > spike_factor * ema)
  accept = finite & ~spike
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  if moe_stats and moe is not None and moe.router == "sigmoid" and frozen is None:
    # The selection bias moves by the measured load, not by its (zero) gradient; with LoRA it is
    # frozen with the rest of the base model (and a DPO/GRPO reference routes as it started).
    params = moe_lib.rebalance(
      params, state["params"], moe_stats["load"], moe.bias_rate, moe.first_dense
    )
  # The learning rate this step applies: the schedule at the optimizer's own count, which skipped
  # steps do not advance; 0 when this step is skipped.
  counts = optax.tree_utils.tree_get_all_with_path(state["opt_state"], "count")
  applied_count = counts[0][1] if counts else state["step"]

  def choose(new, old):
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)

  new_state = {
    **state,  # what the step does not change (a DPO run's frozen reference)
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
    # The count the loss is a mean over: target tokens, or a preference batch's pairs.
    "train/pairs" if preference is not None else "train/tokens": count,
    "train/skipped": (~accept).astype(jnp.int32),
    "train/spike": spike.astype(jnp.int32),
    "train/skipped_nonfinite_total": new_state["skipped_nonfinite"],
    "train/skipped_spikes_total": new_state["skipped_spikes"],
  }
  metrics.update({f"train/{name}": value for name, value in means.items()})
  if moe_stats:
    metrics.update(moe_lib.metrics(moe_stats, 0 if moe is None else moe.first_dense))
  metrics.update(health.layer_norms("grad_norm", grads))
  metrics.update(health.layer_norms("update_norm", updates, scale=accept.astype(jnp.float32)))
  return new_state, metrics


def eval_step(
  params: nnx.State,
  batch: Batch,
  reference: Any = None,
  *,
  graphdef: nnx.GraphDef,
  loss_chunk: int = 0,
  preference: dpo.Preference | None = None,
  adapters: bool = False,
) -> dict[str, jax.Array]:
  """Summed loss and token count of one eval batch (the caller sums over the eval set).

  With ``preference`` also the pair count and the sums of ``dpo.METRICS`` over the batch's
  pairs; the reference is ``reference`` (the state's copy), or with LoRA (``adapters``) the same
  parameters with the adapters off, or none for SimPO, as in ``train_step``.
  """
  loss_sum, weight_sum = loss_lib.loss_sums(params, graphdef, batch, chunk=loss_chunk)
  out = {"loss_sum": loss_sum, "tokens": weight_sum}
  if preference is not None:
    if preference.uses_reference and adapters:
      reference = dpo.adapters_off(params)
    _, (_, pairs, _, sums) = dpo.objective(
      params, graphdef, batch, 0, 0.0, reference=reference, settings=preference
    )
    out.update(sums, pairs=pairs)
  return out
