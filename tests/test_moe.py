"""models/moe.py: dispatch against a dense reference, the routers, the balancing losses, the bias
rule and the errors of bad settings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import model_config

from models import moe as moe_lib

D, E, K, F = 16, 4, 2, 24
CFG = model_config(
    vocab_size=64, d_model=D, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
    max_seq_len=8, mlp="swiglu", norm="rms", positions="rope", use_bias=False,
    tie_embeddings=False, dtype="float32", param_dtype="float32",
)  # fmt: skip
MOE = moe_lib.MoEConfig(num_experts=E, experts_per_token=K, expert_dim=F)


def dense_reference(layer: moe_lib.MoE, x_BLD):
  """Every expert on every token, combined with the router's weights (zero where not chosen)."""
  b, length, d = x_BLD.shape
  x_TD = x_BLD.reshape(-1, d)
  logits_TE = x_TD @ layer.router_kernel[...]
  bias = None if layer.router_bias is None else layer.router_bias[...]
  weights_TK, experts_TK, _ = moe_lib.route(logits_TE, layer.moe, bias)
  combine_TE = (
    jnp.zeros((x_TD.shape[0], layer.moe.num_experts))
    .at[jnp.arange(x_TD.shape[0])[:, None], experts_TK]
    .add(weights_TK)
  )
  kernels = layer.kernels()
  y_TD = jnp.zeros_like(x_TD)
  for e in range(layer.moe.num_experts):
    up = x_TD @ kernels["up"][e]
    h = jax.nn.silu(x_TD @ kernels["gate"][e]) * up if "gate" in kernels else jax.nn.gelu(up)
    y_TD = y_TD + combine_TE[:, e : e + 1] * (h @ kernels["down"][e])
  y_BLD = y_TD.reshape(b, length, d)
  return y_BLD + layer.shared(x_BLD) if layer.shared is not None else y_BLD


def _layer(moe: moe_lib.MoEConfig, mlp: str = "swiglu", seed: int = 0) -> moe_lib.MoE:
  return moe_lib.MoE(dataclasses.replace(CFG, mlp=mlp), moe, rngs=nnx.Rngs(seed))


def _x(seed: int = 1, b: int = 2, length: int = 8):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, length, D)), jnp.float32)


def _loss_and_grads(layer, fn, x):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, x):
    y = fn(nnx.merge(graphdef, params, rest), x)
    return jnp.sum(jnp.sin(y))  # weights every output differently

  return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize(
  "settings",
  [
    {},
    {"mlp": "gelu"},
    {"router": "sigmoid"},
    {"norm_topk": False, "shared_experts": 1},
    {"dispatch": "capacity", "capacity_factor": 4.0},  # room for everything: nothing dropped
  ],
  ids=["swiglu", "gelu", "sigmoid", "unnormalised+shared", "capacity-drops-nothing"],
)
def test_dispatch_equals_the_dense_reference_in_value_and_gradient(settings):
  mlp = settings.pop("mlp", "swiglu")
  layer = _layer(dataclasses.replace(MOE, **settings), mlp)
  if layer.router_bias is not None:  # a bias that changes the choice, not the weights
    layer.router_bias[...] = jnp.asarray([0.3, -0.2, 0.0, 0.1])
  x = _x()
  value, grads = _loss_and_grads(layer, lambda m, x: m(x)[0], x)
  ref_value, ref_grads = _loss_and_grads(layer, dense_reference, x)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert float(layer(x)[1]["dropped"]) == 0.0


def test_capacity_that_fits_everything_equals_dropless_and_a_small_one_drops_and_counts():
  x = _x(seed=2, b=4, length=8)
  dropless = _layer(MOE)
  roomy = _layer(dataclasses.replace(MOE, dispatch="capacity", capacity_factor=float(E)))
  np.testing.assert_allclose(roomy(x)[0], dropless(x)[0], rtol=1e-5, atol=1e-6)
  tight = _layer(dataclasses.replace(MOE, dispatch="capacity", capacity_factor=0.5))
  y, stats = tight(x)
  tokens = 4 * 8
  cap = tight.moe.capacity(tokens)
  assert cap == 8  # ceil(0.5 * 32 * 2 / 4)
  load = np.asarray(stats["load"]) * tokens * K  # assignments per expert
  expected = np.maximum(load - cap, 0).sum() / (tokens * K)
  assert float(stats["dropped"]) == pytest.approx(expected) and expected > 0
  assert np.all(np.isfinite(np.asarray(y)))


def test_the_balancing_loss_has_its_textbook_values():
  t = 8
  uniform = jnp.full((t, E), 1.0 / E)
  balanced = jnp.asarray([[i % E, (i + 1) % E] for i in range(t)], jnp.int32)
  assert float(moe_lib.balance_loss(uniform, balanced)) == pytest.approx(1.0)
  # Everything routed to expert 0 with probability 1: E · 1 · 1.
  collapsed = jnp.zeros((t, E)).at[:, 0].set(1.0)
  all_zero = jnp.zeros((t, 1), jnp.int32)
  assert float(moe_lib.balance_loss(collapsed, all_zero)) == pytest.approx(E)
  # Hand-built: f = (0.5, 0.5, 0, 0), P = (0.4, 0.3, 0.2, 0.1) -> 4 · (0.2 + 0.15) = 1.4.
  probs = jnp.tile(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]), (t, 1))
  half = jnp.asarray([[0, 1]] * t, jnp.int32)
  assert float(moe_lib.balance_loss(probs, half)) == pytest.approx(1.4)
  # The z-loss: logsumexp of E equal logits 0 is log E.
  assert float(moe_lib.z_loss(jnp.zeros((t, E)))) == pytest.approx(np.log(E) ** 2)


def test_the_bias_rule_moves_a_skewed_router_toward_equal_load():
  """A sigmoid router whose logits favour expert 0 strongly: only the selection bias learns."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(512, E)) + np.array([2.0, 0.5, 0.0, -1.0]), jnp.float32)
  moe = dataclasses.replace(MOE, router="sigmoid")
  bias = jnp.zeros((E,))
  first = None
  for _ in range(200):
    _, experts, _ = moe_lib.route(logits, moe, bias)
    load = moe_lib.expert_load(experts, E)
    first = load if first is None else first
    bias = moe_lib.balance_bias(bias, load, rate=0.01)
  assert float(first.max() - first.min()) > 0.3
  assert float(load.max() - load.min()) < 0.05, np.asarray(load)
  # The bias chooses; the weights stay the router's scores.
  weights, experts, _ = moe_lib.route(logits, dataclasses.replace(moe, norm_topk=False), bias)
  np.testing.assert_allclose(weights, jnp.take_along_axis(jax.nn.sigmoid(logits), experts, -1))


def test_softmax_router_weights_follow_norm_topk():
  logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
  weights, experts, probs = moe_lib.route(logits, MOE)
  np.testing.assert_array_equal(experts, [[0, 1]])
  np.testing.assert_allclose(weights, [[0.4 / 0.7, 0.3 / 0.7]], rtol=1e-6)
  weights, _, _ = moe_lib.route(logits, dataclasses.replace(MOE, norm_topk=False))
  np.testing.assert_allclose(weights, [[0.4, 0.3]], rtol=1e-6)
  np.testing.assert_allclose(probs, [[0.4, 0.3, 0.2, 0.1]], rtol=1e-6)


@pytest.mark.parametrize(
  "settings, message",
  [
    ({"experts_per_token": 5}, "model.moe.experts_per_token=5 exceeds model.moe.num_experts=4"),
    ({"num_experts": 0}, "model.moe.num_experts=0"),
    ({"router": "topk"}, "model.moe.router='topk': must be one of softmax, sigmoid"),
    ({"dispatch": "sparse"}, "model.moe.dispatch='sparse'"),
    ({"capacity_factor": 0.0}, "model.moe.capacity_factor=0.0"),
  ],
)
def test_bad_settings_name_the_key(settings, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    dataclasses.replace(MOE, **settings).validate()


def test_jit_and_bfloat16_run():
  layer = moe_lib.MoE(dataclasses.replace(CFG, dtype="bfloat16"), MOE, rngs=nnx.Rngs(0))
  y, stats = nnx.jit(lambda m, x: m(x))(layer, _x().astype(jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 8, D)
  assert float(jnp.sum(stats["load"])) == pytest.approx(1.0)
