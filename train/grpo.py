"""GRPO's objective (``train.objective = "grpo"``): the clipped importance ratio and a k3 KL.

Pure functions of (params, graph definition, batch), beside ``train/dpo.py``. A GRPO batch holds
one completion per row (``train/rl/rollout.py``): the prompt and its sampled completion, weights on
the completion's targets only, and two more [B, L] fields, ``advantages`` (the completion's
group-normalised advantage on each of its targets) and ``old_logps`` (the log-probability the
sampler gave each target, at the sampling temperature).

Per completion token t, with r_t = π(t) / π_old(t) and ε = ``rl.epsilon``:

  loss_t = -min(r_t·A, clip(r_t, 1 - ε, 1 + ε)·A) + β·(exp(ref_t - π_t) - (ref_t - π_t) - 1)

the second term being the k3 estimator of KL(π || ref) (Schulman's "Approximating KL
divergence"), β = ``rl.kl_coef``. The loss is the mean over the batch's completion tokens (the
token-level mean of DAPO and TRL's "dapo" loss type): every token weighs the same, so long
completions are not down-weighted per token. Log-probabilities divide the logits by the sampling
temperature first, so π_old is the distribution the sampler drew from (before top-p, which TRL
also ignores here).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from train import loss as loss_lib
from train.loss import Batch

FIELDS = (("advantages", jnp.float32), ("old_logps", jnp.float32))  # beyond train/programs.py's
# Metrics the step reports; names ending in "_max" are maxima over the batch (train/step.py).
METRICS = ("kl", "clip_fraction", "ratio", "logprob_diff_max")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The ``rl`` group's numbers the jitted step needs (static)."""

  epsilon: float
  kl_coef: float
  temperature: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Settings | None:
    if config.train.objective != "grpo":
      return None
    r = config.rl
    return cls(float(r.epsilon), float(r.kl_coef), float(r.temperature))

  @property
  def uses_reference(self) -> bool:
    return self.kl_coef > 0


def group_advantages(rewards: np.ndarray, group_size: int, eps: float = 1e-4) -> np.ndarray:
  """(r - mean of its group) / (std of its group + eps) for rewards [P·G] in groups of G
  consecutive completions. The standard deviation is the unbiased one (ddof 1), as TRL's
  ``GRPOTrainer`` computes it with torch; a group whose rewards are all equal gets zeros."""
  groups = np.asarray(rewards, np.float64).reshape(-1, group_size)
  mean = groups.mean(axis=1, keepdims=True)
  std = groups.std(axis=1, ddof=1, keepdims=True)
  return ((groups - mean) / (std + eps)).reshape(-1).astype(np.float32)


def token_logps(params, graphdef: nnx.GraphDef, batch: Batch, temperature: float):
  """log π(target) [B, L] at ``temperature``, and an MoE model's router statistics."""
  model = nnx.merge(graphdef, params)
  logits_BLV, stats = model.logits_and_stats(
    batch["inputs"], batch["positions"], batch["segment_ids"]
  )
  logits_BLV = logits_BLV.astype(jnp.float32) / temperature
  logp_BL = -optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets"])
  return logp_BL, loss_lib.with_router_loss(stats, model.cfg.moe)


def token_losses(logp_BL, old_BL, ref_BL, adv_BL, settings: Settings):
  """(loss, k3 KL, clipped?, ratio) per token; ``ref_BL`` None without the KL term."""
  eps = settings.epsilon
  ratio_BL = jnp.exp(logp_BL - old_BL)
  clipped_ratio_BL = jnp.clip(ratio_BL, 1 - eps, 1 + eps)
  loss_BL = -jnp.minimum(ratio_BL * adv_BL, clipped_ratio_BL * adv_BL)
  kl_BL = jnp.zeros_like(logp_BL)
  if ref_BL is not None:
    delta_BL = ref_BL - logp_BL
    kl_BL = jnp.exp(delta_BL) - delta_BL - 1
    loss_BL = loss_BL + settings.kl_coef * kl_BL
  # Where the clipped term is the smaller one, and so has no gradient.
  clipped_BL = ((ratio_BL < 1 - eps) & (adv_BL < 0)) | ((ratio_BL > 1 + eps) & (adv_BL > 0))
  return loss_BL, kl_BL, clipped_BL, ratio_BL


def objective(
  params, graphdef, batch: Batch, chunk: int, z_loss: float, *, reference, settings: Settings
):
  """``train/loss.py``'s ``objective`` for rollouts: (summed loss, (loss sum, completion token
  count, router statistics, metric sums)); the step divides the sums by the token count of the
  whole batch and takes the ``_max`` metrics' maximum. ``chunk`` and ``z_loss`` are refused
  with this objective by validation (train/config.py)."""
  del chunk, z_loss
  logp_BL, stats = token_logps(params, graphdef, batch, settings.temperature)
  ref_BL = None
  if reference is not None:
    ref_BL = jax.lax.stop_gradient(token_logps(reference, graphdef, batch, settings.temperature)[0])
  weights_BL = batch["weights"].astype(jnp.float32)
  old_BL = batch["old_logps"]
  loss_BL, kl_BL, clipped_BL, ratio_BL = token_losses(
    logp_BL, old_BL, ref_BL, batch["advantages"], settings
  )
  tokens = jnp.sum(weights_BL)
  loss_sum = jnp.sum(loss_BL * weights_BL)
  sums = {
    "kl": jnp.sum(kl_BL * weights_BL),
    "clip_fraction": jnp.sum(clipped_BL * weights_BL),
    "ratio": jnp.sum(ratio_BL * weights_BL),
    # The sampler's log-probs against the ones recomputed here (equal at the first inner step
    # up to the two programs' arithmetic; they drift apart as the policy moves).
    "logprob_diff_max": jnp.max(jnp.where(weights_BL > 0, jnp.abs(logp_BL - old_BL), 0.0)),
  }
  total = loss_sum
  if stats:
    total = total + stats["router_loss"] * tokens
  return total, (loss_sum, tokens, stats, sums)
