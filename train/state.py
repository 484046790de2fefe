"""Born-sharded train state: ``jax.eval_shape`` -> shardings from logical names -> jitted init.

The state is a plain pytree, ``{"step": int32[], "params": <nested dict>, "opt_state": ...}``,
so the step, the checkpoints and the optimizer all see ordinary dicts of arrays. Parameters carry
logical axis names in the model (``nnx.with_partitioning``); the rules in config turn them into
mesh shardings here (``mesh_lib.partition_spec``, the one resolver), and the optimizer state
inherits the shardings of the parameters it mirrors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import models
from models.config import ModelConfig
from train.cluster import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What the trainer needs to build, jit, save and restore the state."""

  graphdef: nnx.GraphDef
  abstract: Any  # ShapeDtypeStructs of the train state, with shardings attached
  shardings: Any  # NamedShardings, same structure as the state


def _init_params(model_cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
  model = models.Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
  return nnx.split(model, nnx.Param)


def _train_state(params, tx: optax.GradientTransformation, reference: bool) -> dict[str, Any]:
  """The train state pytree (see train/step.py for what each entry means)."""
  state = {
    "step": jnp.zeros((), jnp.int32),
    "data_offset": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": tx.init(params),
    "loss_ema": jnp.zeros((), jnp.float32),
    "skipped_nonfinite": jnp.zeros((), jnp.int32),
    "skipped_spikes": jnp.zeros((), jnp.int32),
  }
  if reference:  # DPO without LoRA: the frozen starting weights, a copy sharded like params
    state["reference"] = jax.tree.map(lambda x: x, params)  # its own buffers once jitted
  return state


def graphdef_for(model_cfg: ModelConfig) -> nnx.GraphDef:
  """The model's structure for ``model_cfg``, from shapes alone (nothing is allocated)."""
  return nnx.eval_shape(lambda: _init_params(model_cfg, 0))[0]


def state_spec(
  model_cfg: ModelConfig,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  rules,
  seed: int = 0,
  reference: bool = False,
) -> StateSpec:
  """Shapes and shardings of the train state, without allocating it. ``reference``: the state
  also holds a frozen copy of the starting parameters (DPO's reference model, train/dpo.py).

  The reference is saved with the state, so a resumed run reads it from its own checkpoint,
  exactly, and never goes back to ``checkpoint.init_from`` (which may have moved or changed)."""
  # Shapes and logical names only, outside any mesh: the names are resolved to mesh axes below
  # by the one resolver (flax would otherwise resolve them itself under an active mesh).
  graphdef, abstract_vars = nnx.eval_shape(lambda: _init_params(model_cfg, seed))
  param_specs = nnx.to_pure_dict(
    jax.tree.map(
      lambda v: v.replace(mesh_lib.partition_spec(v.get_metadata()["out_sharding"], rules)),
      abstract_vars,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
  )
  # Shapes only: the optimizer state's shardings are derived from the parameters' below.
  abstract_params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abstract_vars)
  )
  abstract = jax.eval_shape(lambda: _train_state(abstract_params, tx, reference))

  def named(spec):
    return NamedSharding(mesh, spec)

  param_shardings = jax.tree.map(named, param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  masked = optax.transforms.MaskedNode  # frozen parameters' places in a LoRA optimizer state
  opt_shardings = optax.tree_utils.tree_map_params(
    tx,
    lambda leaf, sharding: leaf if isinstance(leaf, masked) else sharding,
    abstract["opt_state"],
    param_shardings,
    transform_non_params=lambda _: named(PartitionSpec()),
    is_leaf=lambda x: isinstance(x, masked),
  )
  shardings = {key: named(PartitionSpec()) for key in abstract}  # scalars: replicated
  shardings.update(params=param_shardings, opt_state=opt_shardings)
  if reference:
    shardings["reference"] = param_shardings
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )
  return StateSpec(graphdef=graphdef, abstract=abstract, shardings=shardings)


def init_state(
  spec: StateSpec,
  model_cfg: ModelConfig,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  rules,
  seed: int,
):
  """Creates the train state directly in its shardings: no full copy lands on one device."""

  def init():
    _, params = _init_params(model_cfg, seed)
    return _train_state(nnx.to_pure_dict(params), tx, "reference" in spec.abstract)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    return jax.jit(init, out_shardings=spec.shardings)()


def state_from_params(spec: StateSpec, tx: optax.GradientTransformation, params: Any) -> Any:
  """A fresh train state (step 0, new optimizer) around given parameters, in its shardings."""
  reference = "reference" in spec.abstract
  return jax.jit(
    lambda p: _train_state(p, tx, reference), out_shardings=spec.shardings, donate_argnums=0
  )(params)
