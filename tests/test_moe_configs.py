"""The MoE config files: moe_small's FLOPs against the default model's, the published shapes of
mixtral_8x7b and qwen3_30b_a3b, and their pod layouts checked on the slices they are planned for
(compile-only devices; the compiles themselves take 1–1.5 min each: docs/moe.md has the figures)."""

import importlib

import pytest

import models
from configs import default, moe_small
from train import config as config_lib
from train import plan as plan_cli
from train import planning as plan_lib
from train.cluster import tpu_slice
from train.meter import flops
from train.meter import hardware as topology_lib

# Each config's pod layout and the slice its docstring's figures were compiled for.
PLANNED = {"mixtral_8x7b": "v5p-64", "qwen3_30b_a3b": "v5p-32"}


def model_cfg(config):
  return config_lib.model_config(config, with_tokenizer=False)


def test_moe_small_has_the_default_models_active_flops_plus_its_router():
  config = moe_small.get_config()
  dense, moe = model_cfg(default.get_config()), model_cfg(config)
  assert moe.moe.experts_per_token * moe.moe.expert_dim == dense.mlp_dim
  router = moe.num_layers * moe.d_model * moe.moe.num_experts  # D·E per layer, 8,192 in all
  assert flops.matmul_params(moe) == flops.matmul_params(dense) + router
  seq_len = config.data.seq_len
  dense_flops = flops.train_flops_per_token(dense, seq_len)
  assert flops.train_flops_per_token(moe, seq_len) == dense_flops + 6 * router
  assert 6 * router / dense_flops < 0.002  # the router's share: 0.17%
  # All experts together: four times the dense MLP's weights per layer.
  expert_weights = models.param_count(moe) - models.param_count(dense) - router
  assert expert_weights == 3 * dense.num_layers * 3 * dense.d_model * dense.mlp_dim


@pytest.mark.parametrize(
  "name, total, active",
  [("mixtral_8x7b", 46.70e9, 12.88e9), ("qwen3_30b_a3b", 30.53e9, 3.35e9)],
)
def test_published_sizes(name, total, active):
  """The parameter counts the model cards give (Mixtral 46.7B / 12.9B active; Qwen3 30.5B /
  3.3B active) follow from the shapes in the config files."""
  cfg = model_cfg(importlib.import_module(f"configs.{name}").get_config())
  assert models.param_count(cfg) == pytest.approx(total, rel=1e-3)
  assert models.param_count(cfg, active=True) == pytest.approx(active, rel=1e-3)


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_the_plan_reports_the_dispatch(name):
  """Without compiling: the plan names the dispatch, the experts' split and the active count."""
  config = importlib.import_module(f"configs.{name}").get_config()
  result = plan_lib.plan(config, topology_lib.parse(PLANNED[name]), use_compiler=False)
  cfg = model_cfg(config)
  moe = result["moe"]
  assert moe["dispatch"] == cfg.moe.dispatch and moe["expert_ways"] == config.mesh.expert
  assert moe["exchange"] == "all_to_all in shard_map"
  assert result["params_active"] == models.param_count(cfg, active=True) < result["params"]
  # FLOPs count the active parameters (train/meter/flops.py), not all experts.
  per_token = result["flops_per_step"] / result["tokens_per_step"]
  assert per_token == flops.train_flops_per_token(cfg, config.data.seq_len)
  assert any(line.startswith("MoE: ") for line in plan_cli.summary_lines(result))


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_pod_layout_validates_on_its_slice(name):
  """The config's mesh on its slice's compile-only devices: the checks train.plan and the
  trainer run first (experts divisible by the expert axis, batch by the data-parallel size,
  every parameter's shape by its mesh axes), no compile."""
  topology = topology_lib.parse(PLANNED[name])
  try:
    devices = tpu_slice.compile_only_devices(topology)
  except RuntimeError as e:
    pytest.skip(f"libtpu is not installed here (.ci/run installs it): {e}")
  config = importlib.import_module(f"configs.{name}").get_config()
  resolved = config_lib.validate(config, devices=devices, process_count=1, with_tokenizer=False)
  assert resolved.mesh.shape["expert"] == config.mesh.expert > 1
  assert resolved.model_cfg.moe.num_experts % config.mesh.expert == 0
