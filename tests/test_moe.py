"""models/moe.py: dispatch against a dense reference, the routers, the balancing losses, the bias
rule and the errors of bad settings."""

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import model_config

import models
from configs import default
from models import moe as moe_lib
from models.config import MoEConfig

D, E, K, F = 16, 4, 2, 24
CFG = model_config(
    vocab_size=64, d_model=D, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
    max_seq_len=8, mlp="swiglu", norm="rms", positions="rope", use_bias=False,
    tie_embeddings=False, dtype="float32", param_dtype="float32",
)  # fmt: skip
MOE = MoEConfig(
  **{
    **default.get_config().model.moe.to_dict(),
    "num_experts": E,
    "experts_per_token": K,
    "expert_dim": F,
  }
)


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


def test_auto_dispatch_is_capacity_on_cpus_and_dropless_on_accelerators():
  assert [moe_lib.resolve_dispatch("auto", p) for p in ("cpu", "tpu", "gpu")] == [
    "capacity",
    "dropless",
    "dropless",
  ]
  assert moe_lib.resolve_dispatch("dropless", "cpu") == "dropless"
  x = _x(seed=2, b=4, length=8)
  auto = _layer(dataclasses.replace(MOE, dispatch="auto", capacity_factor=0.5))
  tight = _layer(dataclasses.replace(MOE, dispatch="capacity", capacity_factor=0.5))
  (y_auto, stats_auto), (y_tight, stats_tight) = auto(x), tight(x)
  np.testing.assert_array_equal(y_auto, y_tight)  # this test runs on the CPU backend
  assert float(stats_auto["dropped"]) == float(stats_tight["dropped"]) > 0


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


# --- the MoE model: parameters, the train step on meshes, a run, bad configs ---


def _moe_settings(**fields) -> dict:
  return {**default.get_config().model.moe.to_dict(), "num_experts": E, **fields}


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_an_moe_transformer_has_the_parameters_it_counts(scan, router):
  import models

  cfg = dataclasses.replace(
    CFG, scan_layers=scan, moe=_moe_settings(router=router, shared_experts=1, expert_dim=F)
  )
  model = models.Transformer(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == models.param_count(cfg)
  dense = dataclasses.replace(CFG, scan_layers=scan)
  per_layer = models.param_count(cfg, active=True) - models.param_count(dense)
  swiglu = 3 * D * F  # one expert (or the shared one, of width F)
  # Active: the router, K experts and the shared expert in place of the dense MLP (width 32).
  assert per_layer == cfg.num_layers * (D * E + (K + 1) * swiglu - 3 * D * 32)
  tokens = jnp.zeros((2, 8), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  logits, stats = model.logits_and_stats(tokens, positions)
  assert logits.shape == (2, 8, 64)
  assert stats["load"].shape == (cfg.num_layers, E) and stats["balance_loss"].shape == (2,)


@pytest.mark.parametrize("scan", [True, False])
def test_the_first_layers_can_stay_dense(scan):
  import models

  moe = _moe_settings(expert_dim=F, first_dense=2)
  cfg = dataclasses.replace(CFG, num_layers=3, scan_layers=scan, moe=moe)
  model = models.Transformer(cfg, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == models.param_count(cfg)
  if scan:  # two stacks: the dense layers' and the MoE ones'
    assert params["dense_blocks"]["mlp"]["up_kernel"].shape == (2, D, 32)
    assert params["blocks"]["mlp"]["up_kernel"].shape == (1, E, D, F)
  else:
    assert params["blocks"][1]["mlp"]["up_kernel"].shape == (D, 32)
    assert params["blocks"][2]["mlp"]["up_kernel"].shape == (E, D, F)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  logits, stats = model.logits_and_stats(tokens, positions)
  assert stats["load"].shape == (1, E)  # the one MoE layer's
  # The decode path splits the KV cache between the stacks and joins it again.
  decoded, cache = model.decode(tokens, positions, model.init_cache(2, 8), 0)
  np.testing.assert_allclose(decoded, logits, atol=1e-5)
  assert cache["k"].shape[0] == 3 and float(jnp.abs(cache["k"][0]).max()) > 0
  grads = nnx.state(model, nnx.Param)
  from train import health

  norms = health.layer_norms("p", nnx.to_pure_dict(grads))
  assert {f"p/layer_{i}" for i in range(3)} <= set(norms)


@pytest.mark.parametrize("first_dense", [3, -1])
def test_first_dense_must_leave_moe_layers(first_dense):
  with pytest.raises(ValueError, match=f"model.moe.first_dense={first_dense}"):
    dataclasses.replace(CFG, num_layers=3, moe=_moe_settings(first_dense=first_dense)).validate()


def _moe_config(**moe):
  from configs import tiny

  config = tiny.get_config()
  config.model.moe.update({"num_experts": E, "experts_per_token": K, **moe})
  return config


def _losses_on(config, mesh_sizes, steps=3, hlo=None, context=1):
  from models.config import ModelConfig
  from train import state as state_lib
  from train import trainer
  from train.bench import synthetic_batch
  from train.cluster import mesh as mesh_lib

  config = config.copy_and_resolve_references()
  config.mesh.update(dict(zip(("data", "fsdp", "expert", "tensor"), mesh_sizes, strict=True)))
  config.mesh.context = context
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[: int(np.prod(mesh_sizes)) * context])
  rules = mesh_lib.logical_rules(config.mesh)
  model_cfg = ModelConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=258)
  built = trainer.build_steps(config, mesh, rules, model_cfg)
  spec = built.programs.spec
  state = state_lib.init_state(spec, model_cfg, built.programs.tx, mesh, rules, config.seed)
  first = jax.device_get(state["params"])
  if hlo is not None:
    hlo.append(built.compiled_step.as_text())
  losses, metrics = [], None
  for i in range(steps):
    batch = synthetic_batch(config, 258, built.programs.batch_sharding, seed=i)
    state, metrics = built.compiled_step(state, batch)
    losses.append(float(metrics["train/loss"]))
  return losses, jax.device_get(metrics), first, jax.device_get(state["params"])


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_the_train_step_on_8_devices_equals_one_device_and_moves_only_the_bias_by_load(router):
  dense = 1 if router == "sigmoid" else 0  # and a first dense layer (scanned: its own stack)
  config = _moe_config(router=router, bias_rate=0.01, first_dense=dense)
  reference, metrics, first, last = _losses_on(config, (1, 1, 1, 1))
  losses, _, _, _ = _losses_on(config, (2, 2, 1, 2))
  np.testing.assert_allclose(losses, reference, rtol=2e-5)
  layers = config.model.num_layers
  assert ("moe/load_max/layer_0" in metrics) == (not dense)
  for i in range(dense, layers):
    assert 0 <= metrics[f"moe/load_min/layer_{i}"] <= 1 / E <= metrics[f"moe/load_max/layer_{i}"]
    assert metrics[f"moe/dropped/layer_{i}"] == 0.0
  assert 0 < metrics["moe/balance_loss"] <= E and metrics["moe/z_loss"] > 0
  bias = last["blocks"]["mlp"].get("router_bias")
  if router == "sigmoid":  # three steps of ±rate per expert (0 where exactly at the mean)
    steps = np.round(np.asarray(bias) / 0.01)
    assert np.all(np.abs(steps) <= 3) and np.any(steps != 0), bias
  else:
    assert bias is None


def test_with_lora_the_router_bias_is_frozen_with_the_base_model():
  """The bias moves by the load, not by a gradient; with LoRA it stays as loaded, as every
  frozen weight does (a DPO/GRPO reference, the policy with its adapters off, routes as it
  started); the adapters train."""
  config = _moe_config(router="sigmoid", bias_rate=0.01)
  config.model.lora_rank, config.model.lora_targets = 4, ("q", "v")
  # Three steps: an odd number of ±bias_rate moves can never sum back to the start.
  losses, _, first, last = _losses_on(config, (1, 1, 1, 1), steps=3)
  assert np.isfinite(losses).all()
  np.testing.assert_array_equal(
    last["blocks"]["mlp"]["router_bias"], first["blocks"]["mlp"]["router_bias"]
  )
  assert not np.array_equal(last["blocks"]["attn"]["q_lora"]["b"], 0)


def _saved_residuals(cfg) -> list[tuple[int, ...]]:
  """The shapes the backward pass keeps of a whole model's forward (jax.ad_checkpoint)."""
  graphdef, params = nnx.split(models.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  tokens, positions = jnp.zeros((2, 8), jnp.int32), jnp.broadcast_to(jnp.arange(8), (2, 8))

  def loss(p):
    out = nnx.merge(graphdef, p)(tokens, positions)
    return jnp.sum(out[0] if isinstance(out, tuple) else out)

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):  # "f32[2,32,24] output of ..." a line
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  shapes = re.findall(r"^\w+\[([\d,]*)\]", printed.getvalue(), re.MULTILINE)
  return [tuple(int(n) for n in shape.split(",") if n) for shape in shapes]


def test_save_mlp_keeps_the_experts_input_projections_as_it_keeps_the_dense_mlps():
  """model.remat='save_mlp' keeps the routed experts' gate and up outputs (the stacked layers'
  [2 layers, 16 tokens × K, F] rows, named "mlp" as the dense MLP's are); it had kept nothing of
  them, the same as 'full', while the plan counted them as kept."""
  cfg = dataclasses.replace(CFG, moe=MOE, scan_layers=True)
  rows = (CFG.num_layers, 2 * 8 * K, F)
  assert _saved_residuals(dataclasses.replace(cfg, remat="full")).count(rows) == 0
  assert _saved_residuals(dataclasses.replace(cfg, remat="save_mlp")).count(rows) == 2


_ONE_DEVICE: list = []  # the one-device run the mesh cases compare with (made once)


@pytest.mark.parametrize(
  "mesh_sizes, dispatch, context",
  [
    ((2, 2, 2, 1), "dropless", 1),  # data × fsdp × expert: the experts exchanged by all-to-all
    ((1, 2, 2, 2), "capacity", 1),  # expert × tensor: each device holds a slice of its experts
    ((1, 8, 1, 1), "dropless", 1),  # no expert axis: the experts' kernels over fsdp
    ((1, 2, 2, 1), "dropless", 2),  # each row's length split over a context axis of 2 as well
  ],
)
def test_experts_over_the_mesh_give_one_device_s_losses_and_parameters(
  mesh_sizes, dispatch, context
):
  config = _moe_config(dispatch=dispatch, capacity_factor=float(E))  # capacity: room for all
  # One reference for every case: capacity with room for all equals dropless (tested above).
  if not _ONE_DEVICE:
    _ONE_DEVICE.extend(_losses_on(_moe_config(capacity_factor=float(E)), (1, 1, 1, 1)))
  reference, _, _, last_reference = _ONE_DEVICE
  hlo = []
  losses, metrics, _, last = _losses_on(config, mesh_sizes, hlo=hlo, context=context)
  np.testing.assert_allclose(losses, reference, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), last, last_reference)
  assert all(metrics[f"moe/dropped/layer_{i}"] == 0.0 for i in range(config.model.num_layers))
  if mesh_sizes[2] > 1:  # (the partitioner may also choose all-to-all without an expert axis)
    assert "all-to-all" in hlo[0]


def test_a_small_capacity_over_the_expert_axis_drops_and_counts():
  config = _moe_config(dispatch="capacity", capacity_factor=0.5)
  _, metrics, _, _ = _losses_on(config, (1, 2, 4, 1), steps=1)
  dropped = [metrics[f"moe/dropped/layer_{i}"] for i in range(config.model.num_layers)]
  assert all(0.5 <= x < 1 for x in dropped), dropped  # at most half the assignments fit


def test_a_run_reports_active_parameters_and_logs_the_routers(tmp_path, cache_dir):
  import json

  from cli_helpers import train_in_process

  overrides = {"train.steps": 6, "train.eval_every": 6, "log.every": 3, "checkpoint.every": 6}
  # Trained with capacity (auto on a CPU) at a factor that drops assignments.
  moe = {"num_experts": E, "dispatch": "auto", "capacity_factor": 0.5}
  config_moe = {
    "model.moe": {**default.get_config().model.moe.to_dict(), **moe},
    "mesh.expert": 2,  # experts exchanged by all-to-all in training; not in small decodes
  }
  report = train_in_process(tmp_path / "run", cache_dir, {**overrides, **config_moe})
  assert report["params_active"] < report["params"]
  lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
  logged = [x for x in lines if "moe/load_max/layer_0" in x]
  assert logged and all(np.isfinite(x["train/loss"]) for x in logged)
  assert any("eval/loss" in x for x in lines)

  # Generation and the evaluation harness take the MoE checkpoint unchanged.
  from train.inference import generation, harness, loading

  model = loading.load(str(tmp_path / "run"))
  prompts = ["def ", "import "]
  texts = generation.generate(model, prompts, max_new_tokens=6, temperature=0.0).texts

  class Request:
    def __init__(self, *args):
      self.args = args

  pairs = [Request(*p) for p in zip(prompts, texts, strict=True)]
  scores = harness.loom_lm(model, 4).loglikelihood(pairs)
  assert all(np.isfinite(value) and greedy for value, greedy in scores), (texts, scores)
  # Inference runs every assignment: a row scores the same alone as beside other rows.
  assert model.model_cfg.moe.dispatch == "dropless"
  rows = [Request("def ", "main(argv):\n  return 0\n" * 3), Request("import ", "os, sys, re")]
  # 16 rows: two a device, where capacity would drop the one's tokens for the other's.
  together = harness.loom_lm(model, 16).loglikelihood(rows * 8)
  alone = [harness.loom_lm(model, 1).loglikelihood([row])[0][0] for row in rows]
  np.testing.assert_allclose([value for value, _ in together], alone * 8, rtol=1e-5)


@pytest.mark.parametrize(
  "moe, model, message",
  [
    ({"num_experts": 0, "router": "sigmoid"}, {}, "model.moe.router='sigmoid' set on a dense"),
    ({"num_experts": 4, "experts_per_token": 5}, {}, "model.moe.experts_per_token=5 exceeds"),
    ({"num_experts": 4}, {"quant": "int8"}, "model.quant='int8': the experts of an MoE model"),
    ({"num_experts": 4, "capacity_factor": float("inf")}, {}, "capacity_factor=inf: must be a fin"),
    ({"num_experts": 4, "balance_loss": float("nan")}, {}, "balance_loss=nan: must be a finite"),
    ({"num_experts": 4, "router_z_loss": float("inf")}, {}, "router_z_loss=inf: must be a finite"),
    (
      {"num_experts": 4},
      {"lora_rank": 2, "lora_targets": ("q", "up")},
      r"\['up'\] are MLP kernels",
    ),
  ],
)
def test_bad_moe_configs_are_one_line_errors_before_any_work(moe, model, message):
  from train import config as config_lib

  config = _moe_config()
  config.model.moe.update(moe)
  config.model.update(model)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.model_config(config)


@pytest.mark.parametrize(
  "moe, mesh, message",
  [
    ({"num_experts": 6}, {"expert": 4, "fsdp": 2}, r"num_experts=6 is not divisible by 4"),
    ({"num_experts": 0}, {"expert": 2, "fsdp": 4}, r"split experts .* but the model is dense"),
    (
      {"num_experts": 4},
      {"expert": 2, "fsdp": 4, "rules": (("batch", ("data", "fsdp")), ("expert", "expert"))},
      r"splits the experts over \('expert',\) but the batch only over \('data', 'fsdp'\)",
    ),
  ],
)
def test_an_expert_axis_that_cannot_hold_the_experts_is_refused(moe, mesh, message):
  from train import config as config_lib

  config = _moe_config()
  config.model.moe.update(moe)
  config.mesh.update(mesh)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config, with_tokenizer=False)
