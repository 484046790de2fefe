"""KV-cache decoding reproduces the full-sequence logits: prefill, then one token at a time."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import model_config

from models import Transformer

B, L, PREFILL, CACHE_LEN = 2, 12, 5, 16

BASE = model_config(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    scan_layers=True,
    mlp_dim=64, max_seq_len=CACHE_LEN,
)  # fmt: skip
VARIANTS = {
  "rope-gqa": {},
  "rope-mqa-qknorm-untied": dict(num_kv_heads=1, qk_norm=True, tie_embeddings=False),
  "learned-mha-gpt2": dict(
    num_kv_heads=4, positions="learned", mlp="gelu", norm="layer", use_bias=True
  ),
}


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_matches_full_forward(variant, scan_layers):
  cfg = dataclasses.replace(BASE, scan_layers=scan_layers, **VARIANTS[variant])
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (B, L)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  full = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p))(state, tokens, positions)

  @jax.jit
  def decode(state, tokens, positions, cache, index):
    return nnx.merge(graphdef, state).decode(tokens, positions, cache, index)

  cache = model.init_cache(B, CACHE_LEN)
  assert cache["k"].shape == (cfg.num_layers, B, CACHE_LEN, cfg.num_kv_heads, cfg.head_dim)
  logits, cache = decode(state, tokens[:, :PREFILL], positions[:, :PREFILL], cache, 0)
  np.testing.assert_allclose(logits, full[:, :PREFILL], atol=1e-5, rtol=1e-5)
  for t in range(PREFILL, L):
    step, cache = decode(state, tokens[:, t : t + 1], positions[:, t : t + 1], cache, t)
    assert step.shape == (B, 1, cfg.vocab_size) and step.dtype == jnp.float32
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
  # Slots past the last written token are still empty.
  assert not bool(jnp.any(cache["k"][:, :, L:]))
