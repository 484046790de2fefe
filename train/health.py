"""Training health: what a step records on the device, and what the loop decides from it.

On the device (inside or beside the jitted step, no host round trip): per-layer gradient and
update norms (``layer_norms``), and a ring of the last HEALTH_RING skipped steps
(``init_health`` / ``track_health``), fetched by the loop on log steps only.

On the host, pure functions of what was fetched: the skipped steps not yet reported
(``unseen_skips``), what each one calls for (``after_skip``: go on, roll back, or stop the run
with a ``DivergenceError``) and what a rollback changes (``plan_rollback``). The loop
(``train/loop.py``) only carries these decisions out; ``tests/test_health.py`` calls them directly.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.host.command import EXIT_DIVERGED, LoomError

SPIKE_POLICIES = ("off", "skip", "rollback")


class DivergenceError(LoomError, RuntimeError):
  """The run kept producing non-finite or spiking losses; continuing would waste the job."""

  exit_code = EXIT_DIVERGED


# --- on the device ------------------------------------------------------------------------------


def layer_norms(prefix: str, tree: Any, scale: jax.Array | float = 1.0) -> dict[str, jax.Array]:
  """L2 norms per layer (``<prefix>/layer_<i>``) and per other top-level part (``embed``,
  ``final_norm``, ...). Layers are ``blocks/<i>`` (unrolled) or the leading axis of ``blocks``
  (scanned; an MoE model's first dense layers the leading axis of ``dense_blocks``, numbered
  before the ``blocks``): the same names either way."""
  squares: dict[str, jax.Array] = {}
  dense = tree.get("dense_blocks") if hasattr(tree, "get") else None
  first = jax.tree.leaves(dense)[0].shape[0] if dense else 0

  def add(name: str, value: jax.Array) -> None:
    squares[name] = squares.get(name, 0.0) + value

  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    leaf = leaf.astype(jnp.float32)
    if keys[0] not in ("blocks", "dense_blocks"):
      add(keys[0], jnp.sum(jnp.square(leaf)))
    elif keys[1].isdigit():
      add(f"layer_{keys[1]}", jnp.sum(jnp.square(leaf)))
    else:  # stacked on a leading layers axis
      per_layer = jnp.sum(jnp.square(leaf), axis=tuple(range(1, leaf.ndim)))
      offset = first if keys[0] == "blocks" else 0
      for i in range(leaf.shape[0]):
        add(f"layer_{i + offset}", per_layer[i])
  return {f"{prefix}/{name}": jnp.sqrt(value) * scale for name, value in sorted(squares.items())}


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


# --- on the host: the policy --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Skip:
  """One skipped step, as the ring recorded it."""

  step: int
  spike: bool  # a loss spike (else: a non-finite loss or gradient)
  loss: float
  grad_norm: float
  in_a_row: int  # skipped steps in a row, this one included

  @property
  def kind(self) -> str:
    return "loss spike" if self.spike else "non-finite loss or gradients"


@dataclasses.dataclass(frozen=True)
class Policy:
  """What the config says to do about skipped steps (the ``train`` group)."""

  spike_policy: str  # one of SPIKE_POLICIES
  max_consecutive_skips: int
  max_rollbacks: int

  @classmethod
  def from_config(cls, train: Any) -> Policy:
    return cls(train.spike_policy, int(train.max_consecutive_skips), int(train.max_rollbacks))


def unseen_skips(health: dict[str, np.ndarray], seen: int) -> tuple[list[Skip], int]:
  """The skipped steps recorded since ``seen`` skips were reported, oldest first, and how many
  more the ring no longer holds (counted, not listed)."""
  count = int(health["count"])
  first = max(seen, count - HEALTH_RING)
  skips = []
  for index in range(first, count):
    slot = index % HEALTH_RING
    skips.append(
      Skip(
        step=int(health["step"][slot]),
        spike=bool(health["spike"][slot]),
        loss=float(health["loss"][slot]),
        grad_norm=float(health["grad_norm"][slot]),
        in_a_row=int(health["in_a_row"][slot]),
      )
    )
  return skips, max(first - seen, 0)


class Action(enum.Enum):
  CONTINUE = "continue"  # the step was skipped; training goes on
  ROLLBACK = "rollback"  # back to the newest checkpoint, skipping the data up to the spike


def after_skip(skip: Skip, policy: Policy, rollbacks: int, checkpoints: str) -> Action:
  """What a skipped step calls for, given the rollbacks made so far; raises DivergenceError when
  the run should stop (``checkpoints`` names where the last good checkpoint is, for the message).
  """
  if skip.in_a_row >= policy.max_consecutive_skips:
    raise DivergenceError(
      f"training diverged: {skip.in_a_row} consecutive steps skipped up to step {skip.step} "
      f"(last loss {skip.loss}, grad norm {skip.grad_norm}; train.max_consecutive_skips="
      f"{policy.max_consecutive_skips}). Lower optim.learning_rate, raise optim.warmup_steps, or "
      f"check the data; the last good checkpoint is in {checkpoints}"
    )
  if not (skip.spike and policy.spike_policy == "rollback"):
    return Action.CONTINUE
  if rollbacks >= policy.max_rollbacks:
    raise DivergenceError(
      f"loss spike at step {skip.step} after {rollbacks} rollbacks (train.max_rollbacks="
      f"{policy.max_rollbacks}); stopping. Lower optim.learning_rate or inspect the data around "
      f"step {skip.step}"
    )
  return Action.ROLLBACK


@dataclasses.dataclass(frozen=True)
class Rollback:
  """A rollback to the checkpoint at ``to_step``: the data from it up to the spike is skipped
  for good (``skipped_batches``), and the steps run after it are thrown away (``redone_steps``)."""

  to_step: int
  data_offset: int  # the state's new data offset (data positions = step + data offset)
  skipped_batches: int
  redone_steps: int


def plan_rollback(
  spike_step: int, checkpoint_step: int, checkpoint_data_offset: int, last_dispatched: int
) -> Rollback:
  """A rollback after a spike at ``spike_step`` to the checkpoint at ``checkpoint_step`` (whose
  state has ``checkpoint_data_offset``), when steps up to ``last_dispatched`` have run."""
  skipped = spike_step - checkpoint_step  # the data positions of the steps after the checkpoint
  return Rollback(
    to_step=checkpoint_step,
    data_offset=checkpoint_data_offset + skipped,
    skipped_batches=skipped,
    redone_steps=max(last_dispatched, spike_step) - checkpoint_step,
  )
