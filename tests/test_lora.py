"""LoRA: only the adapters train, frozen weights have no optimizer state, merged export is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from cli_helpers import copy_run, read_metrics, train_in_process, train_losses
from flax import nnx
from test_hf import _hf_logits, _hf_model, _text_ids

from configs import tiny
from train import config as config_lib
from train import init_from, trainer
from train import state as state_lib
from train.bench import synthetic_batch
from train.hf import exporting
from train.inference import generation, loading

ALL = ("q", "k", "v", "out", "gate", "up", "down")


def _lora_config():
  config = tiny.get_config()
  config.model.lora_rank = 4
  config.model.lora_targets = ALL
  return config


def test_only_adapters_change_and_frozen_weights_have_no_optimizer_state():
  config = _lora_config()
  resolved = config_lib.validate(config)
  built = trainer.build_steps(config, resolved.mesh, resolved.rules, resolved.model_cfg)
  programs = built.programs
  state = state_lib.init_state(
    programs.spec, resolved.model_cfg, programs.tx, resolved.mesh, resolved.rules, 0
  )
  params = jax.tree_util.tree_leaves_with_path(state["params"])
  adapters = sum(x.size for p, x in params if "lora" in jax.tree_util.keystr(p))
  total = sum(x.size for _, x in params)
  assert 0 < adapters < total / 4
  # Adam keeps two moments of each adapter parameter and nothing for the frozen ones.
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
  assert moments == 2 * adapters
  before = jax.tree.map(np.asarray, state["params"])
  batch = synthetic_batch(config, resolved.model_cfg.vocab_size, programs.batch_sharding)
  for _ in range(3):
    state, metrics = built.compiled_step(state, batch)
  assert np.isfinite(float(metrics["train/loss"]))
  after = jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state["params"]))
  old = dict(jax.tree_util.tree_leaves_with_path(before))
  for path, value in after:
    name = jax.tree_util.keystr(path)
    if "lora" in name and name.endswith("['b']"):
      assert not np.array_equal(value, old[path]), name  # B starts at zero and moves
    elif "lora" not in name:
      np.testing.assert_array_equal(value, old[path], err_msg=name)


@pytest.mark.slow
def test_lora_run_resumes_bit_for_bit(tmp_path, cache_dir):
  overrides = {"model.lora_rank": 4, "log.every": 1, "checkpoint.every": 10}
  workdir = str(tmp_path / "run")
  train_in_process(workdir, cache_dir, overrides)
  resumed = copy_run(workdir, tmp_path / "resumed", 20)
  report = train_in_process(resumed, cache_dir, overrides)
  assert report["restarted_from_step"] == 10
  assert train_losses(read_metrics(resumed)) == train_losses(read_metrics(workdir))


@pytest.mark.slow
def test_merged_export_equals_the_adapter_model(tmp_path, cache_dir):
  hf_dir, run, out_dir = (str(tmp_path / n) for n in ("hf", "run", "out"))
  _hf_model("llama", hf_dir)
  overrides = {
    "checkpoint.init_from": f"hf:{hf_dir}",
    "model.lora_rank": 4,
    "model.lora_targets": ("q", "v", "up", "down"),
    "train.steps": 6,
    "checkpoint.every": 0,
    "optim.learning_rate": 0.05,
  }
  train_in_process(run, cache_dir, overrides)
  model = loading.load(run)
  assert model.model_cfg.lora_rank == 4
  ids = _text_ids(24)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  with jax.set_mesh(model.mesh), nnx.logical_axis_rules(model.rules):
    adapted = np.asarray(
      jax.jit(lambda p, t: nnx.merge(model.graphdef, p)(t, positions))(
        model.params, jnp.asarray(ids, jnp.int32)
      )
    )
  original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  assert np.abs(adapted - _hf_logits(original.eval(), ids)).max() > 1e-3  # the adapters learned
  exporting.export_checkpoint(run, out_dir)
  merged = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  np.testing.assert_allclose(_hf_logits(merged.eval(), ids), adapted, atol=1e-4, rtol=0)
  sample = generation.generate(model, ["def "], max_new_tokens=4, temperature=0.0)
  assert sample.stats["generated_tokens"] <= 4

  # A new run from the LoRA run (DPO after LoRA SFT) starts from the model it trained: the
  # adapters merged into their kernels (they had been dropped, leaving the base model).
  config = tiny.get_config()
  config.checkpoint.init_from = f"loom:{run}"
  config = init_from.adopt(config)
  resolved = config_lib.validate(config)
  spec = state_lib.state_spec(resolved.model_cfg, optax.identity(), resolved.mesh, resolved.rules)
  params = init_from.load_params(config, spec, resolved.model_cfg, resolved.mesh, resolved.rules)
  assert not any(
    "lora" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
  )
  with jax.set_mesh(resolved.mesh), nnx.logical_axis_rules(resolved.rules):
    started = jax.jit(lambda p, t: nnx.merge(spec.graphdef, p)(t, positions))(
      params, jnp.asarray(ids, jnp.int32)
    )
  np.testing.assert_allclose(np.asarray(started), adapted, atol=1e-4, rtol=0)
  # In another layer layout the adapters could not be merged: refused before any work.
  config = tiny.get_config()
  config.checkpoint.init_from = f"loom:{run}"
  config.model.scan_layers = not model.model_cfg.scan_layers
  with pytest.raises(config_lib.ConfigError, match=r"merged into its weights in its own layer"):
    init_from.adopt(config)
