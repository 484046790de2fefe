"""The jitted train and eval steps with their shardings: one definition for trainer, bench and plan.

``jit_programs`` wires the optimizer, the born-sharded state's shapes and shardings and the pure
steps of ``train/step.py`` into ``jax.jit`` with ``in_shardings``, ``out_shardings`` and
``donate_argnums`` side by side. It touches no device: the trainer compiles the result for the
local devices, ``train.plan`` for a TPU slice it does not have.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from models.config import ModelConfig
from train import dpo, grpo, optimizer, step
from train import state as state_lib
from train.cluster import mesh as mesh_lib

BATCH_FIELDS = (
  ("inputs", jnp.int32),
  ("targets", jnp.int32),
  ("positions", jnp.int32),
  ("segment_ids", jnp.int32),
  ("weights", jnp.float32),
)


@dataclasses.dataclass(frozen=True)
class Programs:
  tx: optax.GradientTransformation
  spec: state_lib.StateSpec
  batch_sharding: jax.sharding.NamedSharding
  abstract_batch: dict[str, jax.ShapeDtypeStruct]
  train_step: Any  # jitted (state, batch) -> (state, metrics); state donated
  eval_step: Any  # jitted (params, batch[, reference]) -> {"loss_sum", "tokens"[, DPO sums]}
  mesh: jax.sharding.Mesh
  rules: Any

  def compile_train_step(self) -> Any:
    """The train step compiled ahead of time for this mesh's devices."""
    with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
      return self.train_step.lower(self.spec.abstract, self.abstract_batch).compile()


def abstract_batch(
  config: ml_collections.ConfigDict, sharding: jax.sharding.NamedSharding
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and sharding of one global train batch (a GRPO rollout batch has two more
  fields, ``train/grpo.py``'s)."""
  shape = (config.train.batch_size, config.data.seq_len)
  fields = BATCH_FIELDS + (grpo.FIELDS if config.train.objective == "grpo" else ())
  return {key: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for key, dtype in fields}


def uses_reference(config: ml_collections.ConfigDict) -> bool:
  """Whether each train step also runs a reference model's forward pass (DPO but SimPO, GRPO
  with rl.kl_coef > 0): the frozen copy, or with LoRA the weights with the adapters off."""
  settings = (dpo.Preference.from_config(config), grpo.Settings.from_config(config))
  return any(s is not None and s.uses_reference for s in settings)


def jit_programs(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules, model_cfg: ModelConfig
) -> Programs:
  """The jitted steps of a validated config (``train/config.py``). Compile with
  ``programs.compile()``, or ``train_step.lower(spec.abstract, abstract_batch).compile()`` under
  ``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules(rules)`` for other devices."""
  lora_only = model_cfg.lora_rank > 0
  tx = optimizer.make_optimizer(config.optim, config.train.steps, lora_only=lora_only)
  schedule = optimizer.learning_rate_schedule(config.optim, config.train.steps)
  preference = dpo.Preference.from_config(config)
  policy = grpo.Settings.from_config(config)
  # DPO's and GRPO's reference: with LoRA the adapters switched off, else a frozen copy in the
  # state.
  reference = not lora_only and uses_reference(config)
  spec = state_lib.state_spec(model_cfg, tx, mesh, rules, seed=config.seed, reference=reference)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  replicated = mesh_lib.replicated(mesh)
  # A GRPO loss is centred on zero (advantages are): a spike against its running mean means
  # nothing there, so only non-finite steps are skipped.
  off = config.train.spike_policy == "off" or policy is not None
  spike_factor = 0.0 if off else config.train.spike_factor
  train_step = jax.jit(
    functools.partial(
      step.train_step,
      graphdef=spec.graphdef,
      tx=tx,
      schedule=schedule,
      microbatches=config.train.microbatches,
      spike_factor=spike_factor,
      frozen=optimizer.frozen_mask(spec.abstract["params"]) if lora_only else None,
      loss_chunk=config.train.loss_chunk,
      z_loss=config.optim.z_loss,
      moe=model_cfg.moe,
      preference=preference,
      policy=policy,
    ),
    in_shardings=(spec.shardings, batch_sharding),
    out_shardings=(spec.shardings, replicated),
    donate_argnums=0,
  )
  # DPO's eval also takes the reference copy, where the state holds one: (params, batch, ref).
  eval_shardings = (spec.shardings["params"], batch_sharding)
  if reference:
    eval_shardings += (spec.shardings["reference"],)
  eval_step = jax.jit(
    functools.partial(
      step.eval_step,
      graphdef=spec.graphdef,
      loss_chunk=config.train.loss_chunk,
      preference=preference,
      adapters=lora_only,
    ),
    in_shardings=eval_shardings,
    out_shardings=replicated,
  )
  return Programs(
    tx=tx,
    spec=spec,
    batch_sharding=batch_sharding,
    abstract_batch=abstract_batch(config, batch_sharding),
    train_step=train_step,
    eval_step=eval_step,
    mesh=mesh,
    rules=rules,
  )
