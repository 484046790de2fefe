"""Logical axis names -> mesh axes, for parameters and activations.

The model names every axis logically ("batch", "embed", "heads", ...) and never mentions a mesh
axis. The trainer activates a mesh and a rule table around model creation and the train step::

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    ...

Outside such a context (unit tests, a single device) everything here is a no-op, so the model runs
unsharded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

LogicalNames = Sequence[str | None]
Rules = Sequence[tuple[str, Any]]  # (logical name, mesh axis | tuple of mesh axes | None)


def _context() -> tuple[tuple[tuple[str, Any], ...], jax.sharding.AbstractMesh] | None:
  """The active (rules, mesh), or None when either is missing."""
  rules = core_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return None
  return tuple(rules), mesh


def is_active() -> bool:
  """True when both a mesh (``jax.set_mesh``) and logical axis rules are set."""
  return _context() is not None


def spec_for(names: LogicalNames, rules: Rules, mesh_axes: Sequence[str]) -> PartitionSpec:
  """The one rule resolver: logical axis names -> a PartitionSpec over ``mesh_axes``.

  Parameters (the train state), activations (``constrain``), batches and the inference cache all
  go through this function. A name with no rule, or whose mesh axes are already taken by an
  earlier dimension of the same array, is replicated: with ("batch", ("data", "fsdp")) and
  ("embed", "fsdp"), an activation ("batch", "length", "embed") is sharded over data x fsdp on
  its batch axis only (a mesh axis may appear once per spec). Mesh axes missing from
  ``mesh_axes`` are dropped, so one rule table serves meshes with and without, say, a "tensor"
  axis. A name may have several rules: the first whose axes are free wins.
  """
  used: set[str] = set()
  spec: list[Any] = []
  for name in names:
    chosen = None
    for logical, physical in rules:
      if name is None or logical != name:
        continue
      axes = (physical,) if isinstance(physical, str) or physical is None else tuple(physical)
      axes = tuple(a for a in axes if a is not None and a in mesh_axes)
      if used.intersection(axes):
        continue
      chosen = axes
      break
    if chosen:
      used.update(chosen)
      spec.append(chosen[0] if len(chosen) == 1 else chosen)
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def active_spec(names: LogicalNames) -> PartitionSpec:
  """``spec_for`` under the active rules and mesh; an empty spec when no context is active."""
  context = _context()
  if context is None:
    return PartitionSpec()
  rules, mesh = context
  return spec_for(names, rules, mesh.axis_names)


def active_axes(names: LogicalNames, dim: int) -> tuple[tuple[str, ...], int]:
  """The mesh axes that split dimension ``dim`` of an array named ``names`` under the active
  rules and mesh, and how many ways they split it: ((), 1) when nothing does (or no context)."""
  context = _context()
  if context is None:
    return (), 1
  entry = active_spec(names)[dim] if dim < len(active_spec(names)) else None
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return axes, math.prod(context[1].shape[a] for a in axes)


def attention_specs(q_BLNH, k_BSKH, v_BSKH, segment_ids_BL, length: str | None):
  """shard_map's specs for attention's inputs under the active rules: rows over "batch", their
  length over the rule named ``length`` (None: whole), heads over "heads" and "kv_heads". Where
  the query heads are split but the key/value heads are not split alike, k and v are repeated to
  one per query head first, so that every shard's groups line up. Returns (k, v, q_spec,
  kv_spec, ids_spec)."""
  n, kv = q_BLNH.shape[2], k_BSKH.shape[2]
  q_spec = active_spec(("batch", length, "heads", None))
  kv_spec = active_spec(("batch", length, "kv_heads", None))
  if q_spec[2] is not None and kv_spec[2] != q_spec[2]:
    k_BSKH, v_BSKH = (jnp.repeat(x, n // kv, axis=2) for x in (k_BSKH, v_BSKH))
    kv_spec = q_spec
  ids_spec = None if segment_ids_BL is None else PartitionSpec(q_spec[0], q_spec[1])
  return k_BSKH, v_BSKH, q_spec, kv_spec, ids_spec


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
  """Constrains an activation's sharding by logical names; a no-op without mesh and rules."""
  if not is_active():
    return x
  if len(names) != x.ndim:
    raise ValueError(f"logical names {tuple(names)} do not match the shape {x.shape}")
  return jax.lax.with_sharding_constraint(x, active_spec(names))


def partitioned(initializer: Callable[..., jax.Array], names: LogicalNames) -> Callable[..., Any]:
  """Wraps an initializer so the created ``nnx.Param`` carries logical axis names.

  The names are kept as the variable's ``out_sharding`` metadata, which the trainer resolves
  with ``spec_for`` (train/state.py). Under an active mesh and rules the value is also created
  sharded, through the same resolver (``constrain``), never through a second rule table.
  """

  def init(*args, **kwargs):
    return constrain(initializer(*args, **kwargs), names)

  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)
