"""A loss that never holds all logits: chunked output layer + cross-entropy, and the z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from train import config as config_lib
from train import loss
from train import state as state_lib
from train.bench import synthetic_batch
from train.programs import jit_programs


def _setup(tie: bool, vocab: int = 258, seq_len: int = 32):
  config = tiny.get_config()
  config.model.tie_embeddings = tie
  config.model.vocab_size = vocab
  config.data.seq_len = seq_len
  resolved = config_lib.validate(config)
  cfg, mesh, rules = resolved.model_cfg, resolved.mesh, resolved.rules
  spec = state_lib.state_spec(cfg, optax.identity(), mesh, rules)
  params = state_lib.init_state(spec, cfg, optax.identity(), mesh, rules, 0)["params"]
  batch = synthetic_batch(config, cfg.vocab_size, jax.sharding.NamedSharding(mesh, jax.P()))
  # Two documents per row and some unweighted targets, as packed data has.
  segments = jnp.where(jnp.arange(seq_len) < seq_len // 3, 1, 2)
  batch = dict(
    batch,
    segment_ids=jnp.broadcast_to(segments, batch["inputs"].shape),
    weights=batch["weights"].at[:, ::5].set(0.0),
  )
  return config, cfg, spec, params, batch


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_the_plain_loss_in_value_and_gradient(tie):
  _, _, spec, params, batch = _setup(tie)

  def mean_loss(p, chunk):
    ce, _, weight = loss.loss_terms(p, spec.graphdef, batch, chunk=chunk)
    return ce / weight

  plain, plain_grads = jax.value_and_grad(mean_loss)(params, 0)
  for chunk in (8, 16):
    value, grads = jax.jit(jax.value_and_grad(mean_loss), static_argnums=1)(params, chunk)
    np.testing.assert_allclose(float(value), float(plain), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_z_loss_adds_the_squared_log_normaliser():
  _, cfg, spec, params, batch = _setup(tie=True)
  logits = nnx.merge(spec.graphdef, params)(
    batch["inputs"], batch["positions"], batch["segment_ids"]
  )
  lse2 = jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * batch["weights"])
  for chunk in (0, 8):
    objective, (ce, _, _, _) = loss.objective(params, spec.graphdef, batch, chunk, 1e-2)
    np.testing.assert_allclose(float(objective), float(ce + 1e-2 * lse2), rtol=1e-5)
    assert float(objective) > float(ce)


@pytest.mark.slow
def test_chunks_shrink_the_compiled_step_by_the_logits():
  """fp32 logits of 8 x 256 x 32768 are 256 MiB, 32 MiB per device of the 8 (the batch is split
  over fsdp), plus their gradient; chunks of 32 positions hold an eighth of that at a time."""
  temps = {}
  for chunk in (0, 32):
    config, cfg, *_ = _setup(tie=True, vocab=32768, seq_len=256)
    config.train.loss_chunk = chunk
    resolved = config_lib.validate(config)
    programs = jit_programs(config, resolved.mesh, resolved.rules, resolved.model_cfg)
    compiled = programs.compile_train_step()
    temps[chunk] = compiled.memory_analysis().temp_size_in_bytes
  logits_per_device = 8 * 256 * 32768 * 4 // jax.device_count()
  assert temps[32] < temps[0] - logits_per_device, temps
