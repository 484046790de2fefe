"""The optimizer: Optax AdamW with a weight-decay mask, a warmup + decay schedule and clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax

from models import lora

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine / linear decay to ``min_lr_ratio`` × peak, or flat."""
  peak = optim_config.learning_rate
  warmup = min(optim_config.warmup_steps, total_steps)
  floor = peak * optim_config.min_lr_ratio
  decay_steps = max(total_steps - warmup, 1)
  kind = optim_config.schedule
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_config.min_lr_ratio)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, floor, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule={kind!r} is not one of {SCHEDULES}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _path_names(path) -> list[str]:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return names


# Top-level model attributes holding lookup tables (models/transformer.py). The untied output
# layer ("unembed") is a dense kernel and decays like one.
EMBEDDING_MODULES = ("embed", "pos_embed")


def is_embedding(path) -> bool:
  names = _path_names(path)
  return bool(names) and names[0] in EMBEDDING_MODULES


def is_norm_or_bias(path) -> bool:
  names = _path_names(path)
  return any("norm" in name for name in names) or (bool(names) and names[-1].endswith("bias"))


def weight_decay_mask(params, optim_config):
  """True for leaves that get weight decay: dense kernels, plus what the config opts in."""

  def decays(path, _):
    if is_embedding(path):
      return bool(optim_config.decay_embeddings)
    if is_norm_or_bias(path):
      return bool(optim_config.decay_norms_and_biases)
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def is_frozen(path) -> bool:
  """With LoRA, every parameter but the adapters is frozen (models/lora.py)."""
  return not lora.is_adapter(_path_names(path))


def frozen_mask(params) -> Any:
  """True for the leaves that LoRA freezes (the same structure as ``params``)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: is_frozen(path), params)


def make_optimizer(
  optim_config, total_steps: int, *, lora_only: bool = False
) -> optax.GradientTransformation:
  """AdamW (decoupled decay under the mask) after global-norm clipping.

  ``lora_only``: the adapters get that chain; every other parameter gets a zero update and no
  optimizer state at all (``optax.set_to_zero`` keeps none), so frozen weights cost nothing.
  """
  chain = _adamw(optim_config, total_steps)
  if not lora_only:
    return chain
  labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
    lambda path, _: "frozen" if is_frozen(path) else "train", params
  )
  return optax.multi_transform({"train": chain, "frozen": optax.set_to_zero()}, labels)


def _adamw(optim_config, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim_config, total_steps)
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  parts.append(
    optax.adamw(
      schedule,
      b1=optim_config.b1,
      b2=optim_config.b2,
      eps=optim_config.eps,
      weight_decay=optim_config.weight_decay,
      mask=lambda params: weight_decay_mask(params, optim_config),
    )
  )
  return optax.chain(*parts)
