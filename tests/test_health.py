"""The loop's policy as pure functions (train/health.py and the step): no subprocess, no faults
injected into a run. What a skipped step calls for, what a rollback changes, when the run stops,
and that a skipped step neither touches the weights nor advances the schedule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from train import health, optimizer, step
from train import state as state_lib
from train.bench import synthetic_batch
from train.cluster import mesh as mesh_lib
from train.config import model_config

POLICY = health.Policy(spike_policy="skip", max_consecutive_skips=3, max_rollbacks=2)


def _skip(step_number=7, spike=False, in_a_row=1):
  return health.Skip(step_number, spike, loss=9.0, grad_norm=1.0, in_a_row=in_a_row)


def _ring_after(outcomes):
  """The health ring after steps 1.. with these outcomes ("ok", "nan" or "spike")."""
  ring = health.init_health()
  for number, outcome in enumerate(outcomes, start=1):
    metrics = {
      "train/skipped": jnp.int32(outcome != "ok"),
      "train/spike": jnp.int32(outcome == "spike"),
      "train/loss": jnp.float32(np.nan if outcome == "nan" else 5.0),
      "train/grad_norm": jnp.float32(1.0),
    }
    ring = health.track_health(ring, metrics, jnp.int32(number))
  return jax.device_get(ring)


def test_a_non_finite_step_is_recorded_and_skipped_and_training_goes_on():
  ring = _ring_after(["ok", "nan", "ok", "spike"])
  skips, missed = health.unseen_skips(ring, seen=0)
  assert missed == 0 and [(s.step, s.spike, s.in_a_row) for s in skips] == [(2, 0, 1), (4, 1, 1)]
  assert np.isnan(skips[0].loss) and skips[0].kind == "non-finite loss or gradients"
  assert health.after_skip(skips[0], POLICY, 0, "ckpts") is health.Action.CONTINUE
  assert health.after_skip(skips[1], POLICY, 0, "ckpts") is health.Action.CONTINUE
  # Already reported skips are not reported again.
  assert health.unseen_skips(ring, seen=2) == ([], 0)


def test_skips_beyond_the_ring_are_counted_not_listed():
  ring = _ring_after(["nan"] * (health.HEALTH_RING + 5))
  skips, missed = health.unseen_skips(ring, seen=0)
  assert missed == 5 and len(skips) == health.HEALTH_RING
  assert [s.step for s in skips] == list(range(6, health.HEALTH_RING + 6))
  assert skips[-1].in_a_row == health.HEALTH_RING + 5


def test_a_spike_rolls_back_under_the_rollback_policy_only():
  rollback = health.Policy("rollback", 3, 2)
  assert health.after_skip(_skip(spike=True), rollback, 0, "ckpts") is health.Action.ROLLBACK
  assert health.after_skip(_skip(spike=False), rollback, 0, "ckpts") is health.Action.CONTINUE
  assert health.after_skip(_skip(spike=True), POLICY, 0, "ckpts") is health.Action.CONTINUE


def test_a_rollback_skips_the_data_up_to_the_spike_and_counts_the_redone_steps():
  # Checkpoint at step 10 (data offset 4), spike found at step 14 while step 16 was dispatched.
  plan = health.plan_rollback(spike_step=14, checkpoint_step=10, checkpoint_data_offset=4,
                              last_dispatched=16)  # fmt: skip
  assert plan == health.Rollback(to_step=10, data_offset=8, skipped_batches=4, redone_steps=6)
  # The spike's step 14 read data position 14 + 4 = 18; step 11 now reads the next one, 19:
  # the batches between the checkpoint and the spike (15..18) are never read again.
  assert 11 + plan.data_offset == 14 + 4 + 1


def test_the_run_stops_after_too_many_skips_in_a_row_or_too_many_rollbacks():
  assert health.after_skip(_skip(in_a_row=2), POLICY, 0, "ckpts") is health.Action.CONTINUE
  with pytest.raises(health.DivergenceError, match=r"3 consecutive steps skipped up to step 7"):
    health.after_skip(_skip(in_a_row=3), POLICY, 0, "/run/checkpoints")
  rollback = health.Policy("rollback", 3, 2)
  assert health.after_skip(_skip(spike=True), rollback, 1, "c") is health.Action.ROLLBACK
  with pytest.raises(health.DivergenceError, match=r"after 2 rollbacks \(train.max_rollbacks=2\)"):
    health.after_skip(_skip(spike=True), rollback, 2, "c")
  assert health.DivergenceError("x").exit_code == 3


def test_a_skipped_step_leaves_the_weights_and_the_schedule_where_they_were():
  config = tiny.get_config()
  config.optim.warmup_steps = 2
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  rules = mesh_lib.logical_rules(config.mesh)
  model_cfg = model_config(config)
  tx = optimizer.make_optimizer(config.optim, config.train.steps)
  schedule = optimizer.learning_rate_schedule(config.optim, config.train.steps)
  spec = state_lib.state_spec(model_cfg, tx, mesh, rules, seed=0)
  state = state_lib.init_state(spec, model_cfg, tx, mesh, rules, 0)
  batch = synthetic_batch(config, model_cfg.vocab_size, mesh_lib.batch_sharding(mesh, rules))
  poisoned = dict(batch, weights=batch["weights"] * jnp.nan)
  train_step = jax.jit(
    functools.partial(step.train_step, graphdef=spec.graphdef, tx=tx, schedule=schedule)
  )

  def count(state):
    return int(optax.tree_utils.tree_get_all_with_path(state["opt_state"], "count")[0][1])

  first, metrics = train_step(state, batch)
  assert count(first) == 1 and float(metrics["train/learning_rate"]) == float(schedule(0))
  skipped, metrics = train_step(first, poisoned)
  assert int(metrics["train/skipped"]) == 1 and float(metrics["train/learning_rate"]) == 0.0
  assert int(skipped["skipped_nonfinite"]) == 1 and int(skipped["step"]) == 2
  assert count(skipped) == 1  # the schedule's own counter did not move
  for a, b in zip(
    jax.tree.leaves(first["params"]), jax.tree.leaves(skipped["params"]), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  # The next good step applies the rate the skipped one would have: schedule(1), not schedule(2).
  _, metrics = train_step(skipped, batch)
  assert float(metrics["train/learning_rate"]) == pytest.approx(float(schedule(1)))
  assert float(schedule(1)) != float(schedule(2))
