"""Causal attention by blocks of queries equals whole-row attention (values and gradients)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.config import ModelConfig

CFG = ModelConfig(
  vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
  max_seq_len=40, scan_layers=False,
)  # fmt: skip


@pytest.mark.parametrize("block", [8, 16, 24])
def test_blocked_attention_equals_whole_rows_on_packed_rows(block):
  rows, length = 3, 40
  tokens = jax.random.randint(jax.random.key(1), (rows, length), 0, CFG.vocab_size)
  # Three documents of uneven lengths per row: block edges fall inside documents.
  segments = jnp.broadcast_to(jnp.searchsorted(jnp.array([13, 29]), jnp.arange(length), "right"),
                              (rows, length)) + 1  # fmt: skip
  starts = jnp.array([0, 13, 29])[segments[0] - 1]
  positions = jnp.broadcast_to(jnp.arange(length) - starts, (rows, length))
  whole = models.Transformer(CFG, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(whole, nnx.Param)
  blocked_def, _ = nnx.split(
    models.Transformer(dataclasses.replace(CFG, attention_block=block), rngs=nnx.Rngs(params=0)),
    nnx.Param,
  )

  def loss(graph, p):
    logits = nnx.merge(graph, p)(tokens, positions, segments)
    return jnp.mean(
      jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    )

  ref, ref_grads = jax.value_and_grad(lambda p: loss(graphdef, p))(params)
  got, grads = jax.value_and_grad(lambda p: loss(blocked_def, p))(params)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
