"""Preference objectives (``train.objective = "dpo"``): DPO, IPO and SimPO over packed pairs.

Pure functions of (params, graph definition, batch), beside ``train/loss.py``'s cross-entropy.
A batch of a ``prefs:`` source holds whole pairs in its rows (``input_pipeline/packing.py``,
``PairPacker``): chosen in segment 2k - 1, rejected in segment 2k, weights on the completion
tokens only. A sequence's log-probability is the sum of its weighted targets' log-probabilities
(TRL's ``logps``); every quantity below is per pair, and the loss is their mean.

``dpo.loss``:
  sigmoid  DPO: -log σ(β·Δ) with Δ = (π_c - ref_c) - (π_r - ref_r); with label smoothing ε the
           conservative form -(1 - ε)·log σ(β·Δ) - ε·log σ(-β·Δ) (cDPO)
  ipo      IPO: (Δ' - 1/(2β))², Δ' the same difference with each log-ratio divided by its
           completion's length (TRL's normalisation, confirmed by the IPO authors)
  simpo    SimPO, reference-free: -log σ(β·(π_c/|c| - π_r/|r|) - γ), label smoothing as above.
           Chosen over ORPO because it is the same pair forward as DPO minus the reference (no
           reference forward, no second copy of the weights) and needs one more number, γ;
           ORPO would add a separate SFT term and its weight to balance against the odds ratio.

Rewards as TRL logs them: β·(π - ref) for DPO and IPO, β·π/|y| for SimPO (its implicit reward).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from models import lora
from train import loss as loss_lib
from train.loss import Batch

LOSSES = ("sigmoid", "ipo", "simpo")
OBJECTIVES = ("lm", "dpo", "grpo")  # grpo: train/grpo.py, run by python -m train.rl
METRICS = (
  "rewards/chosen",
  "rewards/rejected",
  "rewards/accuracies",
  "rewards/margins",
  "logps/chosen",
  "logps/rejected",
)


@dataclasses.dataclass(frozen=True)
class Preference:
  """The ``dpo`` group of a run whose ``train.objective`` is "dpo" (static in the jitted step)."""

  beta: float
  loss: str
  label_smoothing: float
  simpo_gamma: float
  max_pairs: int  # pairs a row can hold at most: (seq_len + 1) // 4 (each sequence >= 2 tokens)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Preference | None:
    if config.train.objective != "dpo":
      return None
    d = config.dpo
    return cls(
      float(d.beta),
      str(d.loss),
      float(d.label_smoothing),
      float(d.simpo_gamma),
      (int(config.data.seq_len) + 1) // 4 + 1,
    )

  @property
  def uses_reference(self) -> bool:
    return self.loss != "simpo"


def adapters_off(params):
  """LoRA's reference model: the same weights with every adapter's B zeroed, so x·A·B adds an
  exact zero (no second copy of the frozen weights; the zeros are adapter-sized)."""

  def off(path, x):
    names = [str(getattr(k, "key", k)) for k in path]
    return jnp.zeros_like(x) if lora.is_adapter(names) and names[-1] == "b" else x

  return jax.lax.stop_gradient(jax.tree_util.tree_map_with_path(off, params))


def sequence_logps(
  params, graphdef: nnx.GraphDef, batch: Batch, max_pairs: int
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Per row and segment [B, 2·max_pairs + 1]: the summed log-probabilities of the weighted
  targets, their count, and an MoE model's router statistics ({} when dense)."""
  model = nnx.merge(graphdef, params)
  logits_BLV, stats = model.logits_and_stats(
    batch["inputs"], batch["positions"], batch["segment_ids"]
  )
  logits_BLV = logits_BLV.astype(jnp.float32)
  logp_BL = -optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets"])
  weights_BL = batch["weights"].astype(jnp.float32)
  segments = 2 * max_pairs + 1
  seg_BL = jnp.where(weights_BL > 0, batch["segment_ids"], 0)  # unweighted targets: bucket 0

  def per_segment(values_L, seg_L):
    return jax.ops.segment_sum(values_L, seg_L, num_segments=segments)

  sums_BS = jax.vmap(per_segment)(logp_BL * weights_BL, seg_BL)
  counts_BS = jax.vmap(per_segment)(weights_BL, seg_BL)
  return sums_BS, counts_BS, loss_lib.with_router_loss(stats, model.cfg.moe)


def pair_losses(
  chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, settings: Preference
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, chosen reward, rejected reward) per pair, from sequence log-probs and lengths."""
  beta, eps = settings.beta, settings.label_smoothing
  chosen_len, rejected_len = jnp.maximum(chosen_len, 1.0), jnp.maximum(rejected_len, 1.0)
  if settings.loss == "simpo":
    chosen_reward, rejected_reward = beta * chosen / chosen_len, beta * rejected / rejected_len
    logits = chosen_reward - rejected_reward - settings.simpo_gamma
    loss = -(1 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
    return loss, chosen_reward, rejected_reward
  chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
  if settings.loss == "ipo":
    delta = chosen_ratio / chosen_len - rejected_ratio / rejected_len
    loss = jnp.square(delta - 1 / (2 * beta))
  else:
    logits = beta * (chosen_ratio - rejected_ratio)
    loss = -(1 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
  return loss, beta * chosen_ratio, beta * rejected_ratio


def pair_terms(params, reference, graphdef, batch: Batch, settings: Preference):
  """Every pair's (valid, loss, chosen reward, rejected reward, chosen logps, rejected logps)
  as [B, max_pairs] arrays, and the router statistics. ``reference`` may be None (SimPO)."""
  sums, counts, stats = sequence_logps(params, graphdef, batch, settings.max_pairs)
  if reference is None:
    ref = jnp.zeros_like(sums)
  else:
    ref = jax.lax.stop_gradient(sequence_logps(reference, graphdef, batch, settings.max_pairs)[0])
  # Segment 0 is padding; 2k - 1 is pair k's chosen sequence, 2k its rejected one.
  chosen, rejected = sums[:, 1::2], sums[:, 2::2]
  chosen_len, rejected_len = counts[:, 1::2], counts[:, 2::2]
  valid = (chosen_len > 0) & (rejected_len > 0)
  loss, chosen_reward, rejected_reward = pair_losses(
    chosen, rejected, ref[:, 1::2], ref[:, 2::2], chosen_len, rejected_len, settings
  )
  return (valid, loss, chosen_reward, rejected_reward, chosen, rejected), stats


def objective(
  params, graphdef, batch: Batch, chunk: int, z_loss: float, *, reference, settings: Preference
):
  """``train/loss.py``'s ``objective`` for pairs: (summed loss, (loss sum, pair count, router
  statistics, metric sums)); the step divides the sums by the pair count of the whole batch.
  ``chunk`` and ``z_loss`` are refused with this objective by validation (train/config.py)."""
  del chunk, z_loss
  terms, stats = pair_terms(params, reference, graphdef, batch, settings)
  valid, loss, chosen_reward, rejected_reward, chosen, rejected = terms
  mask = valid.astype(jnp.float32)
  pairs = jnp.sum(mask)
  loss_sum = jnp.sum(jnp.where(valid, loss, 0.0))
  values = (
    chosen_reward,
    rejected_reward,
    (chosen_reward > rejected_reward).astype(jnp.float32),
    chosen_reward - rejected_reward,
    chosen,
    rejected,
  )
  sums = {name: jnp.sum(jnp.where(valid, v, 0.0)) for name, v in zip(METRICS, values, strict=True)}
  total = loss_sum
  if stats:
    total = total + stats["router_loss"] * pairs
  return total, (loss_sum, pairs, stats, sums)
