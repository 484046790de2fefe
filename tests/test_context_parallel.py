"""Context parallelism (models/context_parallel.py): rows split over the context mesh axis give
the unsharded model's loss and gradients, attention memory per device falls with the axis, and
bad settings are refused before any work."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from cli_helpers import read_metrics, resume_from_step_10, scores_and_greedy_text, train_losses
from flax import nnx
from model_configs import model_config

import models
from configs import default, tiny
from models import context_parallel
from train import config as config_lib
from train import step as step_lib
from train.cluster import mesh as mesh_lib

LENGTH = 32
CFG = model_config(
  vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
  max_seq_len=LENGTH, scan_layers=False, attention="xla",
)  # fmt: skip
RULES = mesh_lib.logical_rules(default.get_config().mesh)


def _cfg(scan: bool, form: str = "all_gather") -> models.ModelConfig:
  """One layer (fast compiles), unrolled or scanned (its parameters then differ)."""
  return dataclasses.replace(CFG, scan_layers=scan, attention_context=form)


def _mesh(context: int, fsdp: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
  sizes = {"data": 1, "fsdp": fsdp, "context": context, "expert": 1, "tensor": tensor}
  devices = jax.devices()[: fsdp * context * tensor]
  return mesh_lib.make_mesh(ml_collections.ConfigDict(sizes), devices)


def _packed_batch() -> dict[str, jax.Array]:
  """Two rows: three documents and padding (segment 0, weight 0), and two documents; the
  document edges fall inside every context shard's stripes."""
  segments = np.stack([np.repeat([1, 2, 3, 0], [10, 7, 9, 6]), np.repeat([1, 2], [19, 13])])
  starts = np.stack([np.repeat([0, 10, 17, 26], [10, 7, 9, 6]), np.repeat([0, 19], [19, 13])])
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, LENGTH + 1), 1, 64))
  return {
    "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
    "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
    "positions": jnp.asarray(np.where(segments > 0, np.arange(LENGTH) - starts, 0), jnp.int32),
    "segment_ids": jnp.asarray(segments, jnp.int32),
    "weights": jnp.asarray(segments > 0, jnp.float32),
  }


@functools.cache
def _params(scan: bool):
  """The parameters (unsharded, created once outside any mesh) of ``_cfg(scan)``."""
  return nnx.split(models.Transformer(_cfg(scan), rngs=nnx.Rngs(params=0)), nnx.Param)[1]


def _loss_and_grads(cfg, batch, chunk: int = 0):
  """The train step's mean loss and gradients (train/step.py), compiled; and the lowered program
  (StableHLO, before the compiler adds the collectives of its own sharding decisions)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))
  params = _params(cfg.scan_layers)
  fn = functools.partial(step_lib.gradients, graphdef=graphdef, microbatches=1, chunk=chunk)
  lowered = jax.jit(lambda p, b: fn(p, batch=b)[0:3:2]).lower(params, batch)
  return lowered.compile()(params, batch), lowered.as_text()


@pytest.fixture(scope="module")
def reference():
  """The unsharded loss and gradients, unrolled and scanned layers (their inits differ)."""
  batch = _packed_batch()
  computed = {}

  def get(scan: bool):
    if scan not in computed:
      computed[scan] = _loss_and_grads(_cfg(scan), batch)[0]
    return batch, computed[scan]

  return get


@pytest.mark.parametrize("form", ["all_gather", "ring"])
@pytest.mark.parametrize(
  "context, fsdp, tensor, chunk, scan",
  [(4, 1, 1, 0, False), (2, 2, 2, 8, True)],
  ids=["context4", "context2xfsdp2xtensor2_scanned_chunked_loss"],
)
def test_context_parallel_equals_the_unsharded_model(
  reference, form, context, fsdp, tensor, chunk, scan
):
  batch, (ref_loss, ref_grads) = reference(scan)
  cfg = _cfg(scan, form)
  with jax.set_mesh(_mesh(context, fsdp, tensor)), nnx.logical_axis_rules(RULES):
    assert context_parallel.shards() == context
    (loss, grads), program = _loss_and_grads(cfg, batch, chunk)
  # The form ran (its own collectives, not the other's), not the reference's [L, L] attention
  # resharded by the compiler.
  ring = "stablehlo.collective_permute" in program
  gather = "stablehlo.all_gather" in program
  assert (ring, gather) == ((True, False) if form == "ring" else (False, True)), form
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  paths = jax.tree_util.tree_leaves_with_path(grads)
  for (path, got), want in zip(paths, jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(
      np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=path
    )


def test_all_gather_by_query_blocks_equals_the_unsharded_model(reference):
  """model.attention_block = 4 cuts each shard's 16 local queries into 4 blocks (scanned, each
  rematerialised): the same loss and gradients."""
  batch, (ref_loss, ref_grads) = reference(False)
  cfg = dataclasses.replace(_cfg(False), attention_block=4)
  with jax.set_mesh(_mesh(2)), nnx.logical_axis_rules(RULES):
    (loss, grads), program = _loss_and_grads(cfg, batch)
  assert "stablehlo.while" in program  # the scan over query blocks
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("context, fsdp, tensor", [(2, 1, 1), (2, 2, 2)])
def test_splash_per_shard_equals_the_unsharded_model(context, fsdp, tensor):
  """The all-gather form with the splash kernel per shard (models/attention.py, in Pallas
  interpret mode on the CPU): rows of 256 tokens packed with documents and padding, each
  shard's 128 striped queries against the gathered row; the loss and gradients of the
  unsharded XLA model, and the kernel (forward, dq, dkv) is what ran."""
  length = 256
  cfg = dataclasses.replace(CFG, max_seq_len=length)
  segments = np.stack([np.repeat([1, 2, 3, 0], [100, 70, 70, 16]), np.repeat([1, 2], [191, 65])])
  starts = np.stack(
    [np.repeat([0, 100, 170, 240], [100, 70, 70, 16]), np.repeat([0, 191], [191, 65])]
  )
  tokens = np.asarray(jax.random.randint(jax.random.key(4), (2, length + 1), 1, 64))
  batch = {
    "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
    "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
    "positions": jnp.asarray(np.where(segments > 0, np.arange(length) - starts, 0), jnp.int32),
    "segment_ids": jnp.asarray(segments, jnp.int32),
    "weights": jnp.asarray(segments > 0, jnp.float32),
  }
  (ref_loss, ref_grads), _ = _loss_and_grads(cfg, batch)
  splash = dataclasses.replace(cfg, attention="splash")
  with jax.set_mesh(_mesh(context, fsdp, tensor)), nnx.logical_axis_rules(RULES):
    (loss, grads), program = _loss_and_grads(splash, batch)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.Transformer(splash, rngs=nnx.Rngs(0))))
    fn = functools.partial(step_lib.gradients, graphdef=graphdef, microbatches=1, chunk=0)
    jaxpr = str(jax.make_jaxpr(lambda p: fn(p, batch=batch)[0])(_params(False)))
  assert jaxpr.count("pallas_call") == 3 and "stablehlo.all_gather" in program
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_the_striped_layout_puts_token_t_on_shard_t_mod_c():
  row = jnp.arange(2 * 12).reshape(2, 12)
  striped = context_parallel.to_striped(row, 4)
  shards = np.asarray(striped).reshape(2, 4, 3)  # a contiguous split of the permuted row
  for r in range(4):
    np.testing.assert_array_equal(shards[0, r], np.arange(r, 12, 4))
  np.testing.assert_array_equal(context_parallel.from_striped(striped, 4), row)


def test_attention_memory_per_device_falls_as_the_context_axis_grows():
  """Compiled temporaries of one layer's forward and backward at a fixed row of 128 tokens,
  where the [L, L] scores dominate: at context C a device holds [L / C, L] of them."""
  length = 128
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  temps = {}
  for form in ("all_gather", "ring"):
    cfg = dataclasses.replace(
      CFG, num_layers=1, max_seq_len=length, attention_block=0, attention_context=form
    )
    graphdef, params = nnx.split(
      nnx.eval_shape(lambda cfg=cfg: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    )

    def loss(p, tokens, positions, segments, graphdef=graphdef):
      return jnp.sum(jax.nn.logsumexp(nnx.merge(graphdef, p)(tokens, positions, segments), -1))

    # At context 1 both forms are the same program (the reference attention): compiled once.
    for context in (1, 2, 4) if form == "all_gather" else (2, 4):
      with jax.set_mesh(_mesh(context)), nnx.logical_axis_rules(RULES):
        compiled = jax.jit(jax.grad(loss)).lower(params, ids, ids, ids).compile()
      temps[form, context] = compiled.memory_analysis().temp_size_in_bytes
  for form in ("all_gather", "ring"):
    at_1 = temps["all_gather", 1]
    assert at_1 > temps[form, 2] > temps[form, 4], temps


def _validate(**overrides):
  config = tiny.get_config()
  config.mesh.fsdp, config.mesh.context = 4, 2
  for key, value in overrides.items():
    group, name = key.split(".")
    config[group][name] = value
  return config_lib.validate(config, devices=jax.devices())


def test_bad_context_settings_are_refused_before_any_work():
  resolved = _validate()  # tiny's rows of 32 tokens split 2 ways: accepted
  assert resolved.mesh.shape["context"] == 2
  with pytest.raises(config_lib.ConfigError, match=r"data.seq_len=33 is not divisible by 2,"):
    _validate(**{"data.seq_len": 33})
  with pytest.raises(config_lib.ConfigError, match=r"model.attention_block=12 does not divide"):
    _validate(**{"model.attention_block": 12})  # 16 positions per shard
  with pytest.raises(config_lib.ConfigError, match=r"each shard's data.seq_len / 2 = 64 tokens"):
    _validate(**{"model.attention": "splash", "data.seq_len": 128, "model.max_seq_len": 128})
  with pytest.raises(
    config_lib.ConfigError, match=r"model.attention_context='zigzag' is not one of .*'ring'"
  ):
    _validate(**{"model.attention_context": "zigzag"})
  rules = tuple(r for r in RULES if r[0] != "batch") + (("batch", ("fsdp", "context")),)
  with pytest.raises(
    config_lib.ConfigError,
    match=r"mesh.context=2 but mesh.rules splits a batch's 'length' over \(\)",
  ):
    _validate(**{"mesh.rules": rules})
  rules = tuple(r for r in RULES if r[0] != "embed") + (("embed", ("context",)),)
  with pytest.raises(config_lib.ConfigError, match=r"would be split over the context axis"):
    _validate(**{"mesh.rules": rules, "mesh.fsdp": 1, "mesh.data": 4})


@pytest.mark.slow
def test_a_context_run_resumes_across_the_split_and_its_checkpoint_serves_inference(
  tiny_reference, tmp_path, cache_dir
):
  """configs/tiny.py resumed from the one-device reference's step 10 with each row split over 2
  devices: the reference's losses (its eval and greedy sample included, run by the trainer on
  the context mesh); the checkpoint it writes loads for generation and lm-eval scoring (the
  loader folds the context axis into fsdp) and scores and samples as the reference's."""
  workdir = str(tmp_path / "context")
  overrides = ("--config.mesh.context=2", "--config.model.attention_context=ring")
  resume_from_step_10(tiny_reference, workdir, *overrides, cache_dir=cache_dir)
  expected, got = (train_losses(read_metrics(w)) for w in (tiny_reference, workdir))
  assert sorted(got) == sorted(expected)
  steps = sorted(got)
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=2e-5)
  model, scores, sample = scores_and_greedy_text(workdir)
  assert model.step == 20 and model.mesh.shape["context"] == 1
  _, want_scores, want_sample = scores_and_greedy_text(tiny_reference)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-3)
  assert sample.texts == want_sample.texts and sample.texts[0]
