"""The train step on its own: gradient accumulation, the decay mask, meshes, sharding rules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from models.config import ModelConfig
from train import loss, optimizer, step, trainer
from train import state as state_lib
from train.bench import synthetic_batch
from train.cluster import mesh as mesh_lib

VOCAB = 258


def _config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    group, name = key.split(".")
    config[group][name] = value
  return config


def _model_cfg(config):
  return ModelConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=VOCAB)


def _state(config, mesh):
  rules = mesh_lib.logical_rules(config.mesh)
  model_cfg = _model_cfg(config)
  tx = optimizer.make_optimizer(config.optim, config.train.steps)
  spec = state_lib.state_spec(model_cfg, tx, mesh, rules, seed=config.seed)
  return spec, tx, state_lib.init_state(spec, model_cfg, tx, mesh, rules, config.seed)


def _batch(config, sharding, seed=0):
  batch = synthetic_batch(config, VOCAB, sharding, seed=seed)
  # Two documents per row, so the loss mask matters.
  half = config.data.seq_len // 2
  segments = np.ones((config.train.batch_size, config.data.seq_len), np.int32)
  segments[:, half:] = 2
  weights = np.ones_like(segments, np.float32)
  weights[:, half - 1] = 0.0
  batch["segment_ids"] = jax.device_put(segments, sharding)
  batch["weights"] = jax.device_put(weights, sharding)
  return batch


def test_microbatch_accumulation_equals_full_batch():
  config = _config()
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  spec, tx, state = _state(config, mesh)
  batch = _batch(config, mesh_lib.batch_sharding(mesh, mesh_lib.logical_rules(config.mesh)))
  schedule = optimizer.learning_rate_schedule(config.optim, config.train.steps)
  run = functools.partial(step.train_step, graphdef=spec.graphdef, tx=tx, schedule=schedule)
  full_state, full_metrics = jax.jit(functools.partial(run, microbatches=1))(state, batch)
  micro_state, micro_metrics = jax.jit(functools.partial(run, microbatches=4))(state, batch)
  np.testing.assert_allclose(full_metrics["train/loss"], micro_metrics["train/loss"], rtol=1e-6)
  np.testing.assert_allclose(
    full_metrics["train/grad_norm"], micro_metrics["train/grad_norm"], rtol=1e-5
  )
  for a, b in zip(
    jax.tree.leaves(full_state["params"]), jax.tree.leaves(micro_state["params"]), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_spares_norms_biases_and_embeddings():
  config = _config(
    **{"model.use_bias": True, "model.positions": "learned", "model.tie_embeddings": False}
  )
  model_cfg = _model_cfg(config)
  params = nnx.to_pure_dict(
    nnx.state(
      nnx.eval_shape(lambda: __import__("models").Transformer(model_cfg, rngs=nnx.Rngs(0))),
      nnx.Param,
    )
  )
  mask = optimizer.weight_decay_mask(params, config.optim)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["['embed']['table']"] is False
  assert flat["['pos_embed']['table']"] is False
  assert flat["['unembed']"] is True
  assert flat["['blocks']['mlp']['up_kernel']"] is True
  assert flat["['blocks']['attn']['q_kernel']"] is True
  assert flat["['final_norm']['scale']"] is False
  biases = [k for k in flat if k.endswith("bias']")]
  assert biases and not any(flat[k] for k in biases)
  config.optim.decay_embeddings = True
  config.optim.decay_norms_and_biases = True
  assert all(jax.tree.leaves(optimizer.weight_decay_mask(params, config.optim)))


def test_schedule_warms_up_then_decays_to_floor():
  config = _config(**{"optim.warmup_steps": 10, "optim.min_lr_ratio": 0.1})
  schedule = optimizer.learning_rate_schedule(config.optim, 100)
  peak = config.optim.learning_rate
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(10), peak, rtol=1e-6)
  np.testing.assert_allclose(schedule(100), 0.1 * peak, rtol=1e-5)
  for kind in ("linear", "constant"):
    config.optim.schedule = kind
    schedule = optimizer.learning_rate_schedule(config.optim, 100)
    np.testing.assert_allclose(schedule(100), peak * (0.1 if kind == "linear" else 1), rtol=1e-5)


def _losses_on(mesh_sizes, steps=3):
  data, fsdp, context, tensor = mesh_sizes
  sizes = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.context": context, "mesh.tensor": tensor}
  config = _config(**sizes)
  devices = jax.devices()[: data * fsdp * context * tensor]
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = mesh_lib.logical_rules(config.mesh)
  model_cfg = _model_cfg(config)
  built = trainer.build_steps(config, mesh, rules, model_cfg)
  tx, spec, train_step = built.programs.tx, built.programs.spec, built.compiled_step
  batch_sharding = built.programs.batch_sharding
  state = state_lib.init_state(spec, model_cfg, tx, mesh, rules, config.seed)
  losses = []
  for i in range(steps):
    state, metrics = train_step(state, _batch(config, batch_sharding, seed=i))
    losses.append(float(metrics["train/loss"]))
  return losses, state, spec, mesh


@functools.cache
def _one_device_losses():
  return _losses_on((1, 1, 1, 1))[0]


# (data, fsdp, context, tensor); context: rows split over it (models/context_parallel.py).
@pytest.mark.parametrize("mesh_sizes", [(8, 1, 1, 1), (2, 4, 1, 1), (1, 2, 2, 2)])
def test_sharded_losses_match_one_device(mesh_sizes):
  reference = _one_device_losses()
  losses, state, spec, mesh = _losses_on(mesh_sizes)
  np.testing.assert_allclose(losses, reference, rtol=2e-5)
  # Every parameter and optimizer-state leaf lives in the sharding its logical names imply.
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(spec.shardings), strict=True):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.shape, leaf.sharding)


def test_parameter_shardings_follow_the_rules():
  config = _config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
  mesh = mesh_lib.make_mesh(config.mesh)
  spec, _, state = _state(config, mesh)
  specs = {
    jax.tree_util.keystr(p): s.spec
    for p, s in jax.tree_util.tree_flatten_with_path(spec.shardings["params"])[0]
  }
  P = jax.sharding.PartitionSpec
  assert specs["['blocks']['attn']['q_kernel']"] == P("stage", "fsdp", "tensor", None)
  assert specs["['blocks']['mlp']['down_kernel']"] == P("stage", "tensor", "fsdp")
  assert specs["['embed']['table']"] == P("tensor", "fsdp")
  q = state["params"]["blocks"]["attn"]["q_kernel"]
  # [layers, embed, heads, head_dim] = [2, 32, 4, 8] split 4 ways on embed and 2 on heads.
  assert {shard.data.shape for shard in q.addressable_shards} == {(2, 8, 2, 8)}
  mu = state["opt_state"][1][0].mu["blocks"]["attn"]["q_kernel"]
  assert {shard.data.shape for shard in mu.addressable_shards} == {(2, 8, 2, 8)}


def test_loss_ignores_masked_targets():
  config = _config()
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  spec, _, state = _state(config, mesh)
  batch = _batch(config, mesh_lib.batch_sharding(mesh, mesh_lib.logical_rules(config.mesh)))
  loss_sum, tokens = loss.loss_sums(state["params"], spec.graphdef, batch)
  assert float(tokens) == float(jnp.sum(batch["weights"]))
  changed = dict(batch, targets=batch["targets"].at[:, config.data.seq_len // 2 - 1].set(7))
  assert float(loss.loss_sums(state["params"], spec.graphdef, changed)[0]) == float(loss_sum)
