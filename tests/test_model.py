"""Properties of models.Transformer: causality, packing, jit, scan vs loop, remat, dtypes, size."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from model_configs import model_config

import models
from models import ModelConfig, Transformer, lora

B, L = 2, 16

GPT2_LIKE = model_config(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
    scan_layers=True,
    mlp_dim=128, max_seq_len=L, mlp="gelu", norm="layer", norm_eps=1e-5, positions="learned",
    tie_embeddings=True, use_bias=True,
)  # fmt: skip
LLAMA_LIKE = model_config(
    vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    scan_layers=True,
    mlp_dim=64, max_seq_len=L, mlp="swiglu", norm="rms", positions="rope", rope_theta=500.0,
    qk_norm=True, tie_embeddings=False, use_bias=False,
)  # fmt: skip
CONFIGS = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE}


def _inputs(seed: int = 0, batch: int = B, length: int = L):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 64, (batch, length)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return tokens, positions


def _forward(cfg: ModelConfig, seed: int = 0, **overrides):
  """(graphdef, state) of a fresh model; the state is what jitted pure functions take."""
  model = Transformer(dataclasses.replace(cfg, **overrides), rngs=nnx.Rngs(seed))
  return nnx.split(model)


def _apply(graphdef, state, *args):
  return nnx.merge(graphdef, state)(*args)


# Tests run the model jitted (op-by-op dispatch is slow on CPU) except where eager is the point.
_jit_apply = jax.jit(_apply, static_argnums=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_by_gradients(name):
  # Untied, so each row of the token table is used once per distinct token and nowhere else.
  cfg = dataclasses.replace(CONFIGS[name], tie_embeddings=False)
  graphdef, state = _forward(cfg)
  tokens = jnp.arange(L, dtype=jnp.int32)[None] * 3 % 64  # distinct tokens: row = position
  _, positions = _inputs(batch=1)

  def logits_per_position(table):
    params = nnx.State(state)
    params["embed"]["table"] = nnx.Param(table)
    return _apply(graphdef, params, tokens, positions)[0].sum(-1)  # [L]

  table = state["embed"]["table"][...]
  jac_LVD = jax.jit(jax.jacrev(logits_per_position))(table)
  grad_norm = jnp.linalg.norm(jac_LVD[:, tokens[0]], axis=-1)  # [t, t'] = |d logits[t]/d x[t']|
  future = np.triu(np.ones((L, L), bool), k=1)
  assert float(jnp.max(jnp.where(future, grad_norm, 0))) == 0.0
  assert float(jnp.min(jnp.where(future, jnp.inf, grad_norm))) > 0.0  # the past does matter


@pytest.mark.parametrize("name", CONFIGS)
def test_segments_are_isolated(name):
  cfg = CONFIGS[name]
  graphdef, state = _forward(cfg)
  tokens, _ = _inputs()
  half = L // 2
  segment_ids = jnp.asarray([[1] * half + [2] * half] * B, jnp.int32)
  positions = jnp.asarray([list(range(half)) * 2] * B, jnp.int32)
  logits = _jit_apply(graphdef, state, tokens, positions, segment_ids)
  other = tokens.at[:, half:].set((tokens[:, half:] + 7) % 64)
  logits_other = _jit_apply(graphdef, state, other, positions, segment_ids)
  np.testing.assert_array_equal(logits[:, :half], logits_other[:, :half])
  assert not np.allclose(logits[:, half:], logits_other[:, half:])
  # Segment 2 behaves exactly as if it were a sequence of its own.
  alone = _jit_apply(graphdef, state, tokens[:, half:], positions[:, half:])
  np.testing.assert_allclose(logits[:, half:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_jit_matches_no_jit(name):
  graphdef, state = _forward(CONFIGS[name])
  tokens, positions = _inputs()
  eager = _apply(graphdef, state, tokens, positions)
  jitted = _jit_apply(graphdef, state, tokens, positions)
  assert eager.shape == (B, L, 64) and eager.dtype == jnp.float32
  np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def unstack_into(unrolled: Transformer, scanned: Transformer) -> None:
  """Copies a scanned model's stacked block params into an unrolled model's per-layer blocks."""
  source = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  stacked = source.pop("blocks")
  num_layers = len(unrolled.blocks)
  source["blocks"] = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)}
  target = nnx.state(unrolled, nnx.Param)
  nnx.replace_by_pure_dict(target, source)
  nnx.update(unrolled, target)


@pytest.mark.parametrize("name", CONFIGS)
def test_scan_matches_unrolled(name):
  cfg = CONFIGS[name]
  scanned = Transformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0))
  unrolled = Transformer(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(1))
  tokens, positions = _inputs()
  before = _jit_apply(*nnx.split(unrolled), tokens, positions)
  unstack_into(unrolled, scanned)
  after = _jit_apply(*nnx.split(unrolled), tokens, positions)
  assert not np.allclose(before, after)  # the copy really replaced every block
  expected = _jit_apply(*nnx.split(scanned), tokens, positions)
  np.testing.assert_allclose(expected, after, atol=1e-5, rtol=1e-5)


def _loss(graphdef, params, tokens, positions):
  logits = _apply(graphdef, params, tokens, positions)
  targets = jnp.roll(tokens, -1, axis=1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize(
  "remat, scan_layers",
  [
    ("full", True),
    ("save_dots", True),
    ("save_dots", False),
    ("save_attention", True),
    ("save_mlp", False),
    ("save_attention_mlp", True),
  ],
)
def test_remat_matches_none(remat, scan_layers):
  tokens, positions = _inputs()
  results = {}
  for policy in ("none", remat):
    graphdef, state = _forward(LLAMA_LIKE, scan_layers=scan_layers, remat=policy)
    grad_fn = jax.value_and_grad(_loss, argnums=1)
    jaxpr = str(jax.make_jaxpr(grad_fn, static_argnums=0)(graphdef, state, tokens, positions))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (policy != "none")
    results[policy] = jax.jit(grad_fn, static_argnums=0)(graphdef, state, tokens, positions)
  (loss_a, grads_a), (loss_b, grads_b) = results["none"], results[remat]
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_a, grads_b
  )
  assert float(optax.tree.norm(grads_a)) > 0


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_compute_with_fp32_params(name):
  tokens, positions = _inputs()
  graphdef32, state32 = _forward(CONFIGS[name])
  graphdef16, state16 = _forward(CONFIGS[name], dtype="bfloat16")
  dtypes = {x.dtype for x in jax.tree.leaves(state16)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  logits16 = _jit_apply(graphdef16, state16, tokens, positions)
  logits32 = _jit_apply(graphdef32, state32, tokens, positions)
  assert logits16.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits16)))
  scale = float(jnp.abs(logits32).max())
  assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * scale
  assert not np.array_equal(logits16, logits32)  # bf16 really was used


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_param_count(name, tied, scan_layers):
  cfg = dataclasses.replace(CONFIGS[name], tie_embeddings=tied, scan_layers=scan_layers)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  sizes = {"/".join(map(str, path)): int(np.prod(v.shape)) for path, v in params}
  assert models.param_count(cfg) == sum(sizes.values())
  embedding_tables = sizes["embed/table"] + sizes.get("pos_embed/table", 0)
  assert models.param_count(cfg, embeddings=False) == sum(sizes.values()) - embedding_tables


def test_param_count_counts_qwen2s_qkv_biases():
  cfg = dataclasses.replace(LLAMA_LIKE, qkv_bias=True)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  assert models.param_count(cfg) == sum(int(np.prod(v.shape)) for _, v in params)


@pytest.mark.parametrize("mlp, targets", [("swiglu", lora.TARGETS), ("gelu", ("q", "gate", "up"))])
def test_param_count_with_lora(mlp, targets):
  cfg = dataclasses.replace(
    CONFIGS[next(iter(CONFIGS))], mlp=mlp, lora_rank=4, lora_targets=targets
  )
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  sizes = {"/".join(map(str, path)): int(np.prod(v.shape)) for path, v in params}
  assert models.param_count(cfg) == sum(sizes.values())
  adapters = sum(size for path, size in sizes.items() if "lora" in path)
  assert models.lora_count(cfg) == adapters > 0


def test_gpt2_small_param_count():
  # The published GPT-2 small size (124,439,808 with the tied 50257 x 768 table).
  cfg = model_config(
      vocab_size=50257, d_model=768, num_layers=12, num_heads=12, num_kv_heads=12, head_dim=64,
      mlp_dim=3072, max_seq_len=1024, mlp="gelu", norm="layer", positions="learned",
      use_bias=True,
  )  # fmt: skip
  assert models.param_count(cfg) == 124_439_808


def test_llama_param_counts():
  # Published sizes: Llama-3.2-1B (tied, GQA 32/8) and Llama-2-7B (untied, MHA).
  llama32_1b = model_config(
    vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
    mlp_dim=8192, max_seq_len=8192, tie_embeddings=True,
  )  # fmt: skip
  llama2_7b = model_config(
    vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
    mlp_dim=11008, max_seq_len=4096, tie_embeddings=False,
  )  # fmt: skip
  assert models.param_count(llama32_1b) == 1_235_814_400
  assert models.param_count(llama2_7b) == 6_738_415_616


@pytest.mark.parametrize(
  "remat, kept",
  [
    ("full", set()),
    ("save_attention", {"attention"}),
    ("save_mlp", {"mlp"}),
    ("save_attention_mlp", {"attention", "mlp"}),
  ],
)
def test_named_remat_policies_keep_exactly_the_named_outputs(remat, kept):
  from jax._src.ad_checkpoint import saved_residuals

  tokens, positions = _inputs()
  graphdef, state = _forward(LLAMA_LIKE, scan_layers=False, remat=remat)
  saved = saved_residuals(lambda p: _loss(graphdef, p, tokens, positions), state)
  names = {n for _, where in saved for n in ("attention", "mlp") if f"named '{n}'" in where}
  assert names == kept
