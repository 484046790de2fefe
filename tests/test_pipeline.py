"""Pipeline parallelism (models/pipeline.py): the layers split over a stage mesh axis give the
unpipelined model's loss and gradients under both schedules; the checkpoint does not depend on
the schedule; bad settings are refused before any work."""

import dataclasses
import functools
import json
import os
from types import SimpleNamespace

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
from models import pipeline
from train import config as config_lib
from train import step as step_lib
from train.cluster import mesh as mesh_lib
from train.inference import harness

LENGTH = 32
CFG = model_config(
  vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
  max_seq_len=LENGTH, scan_layers=True, attention="xla",
)  # fmt: skip
RULES = mesh_lib.logical_rules(default.get_config().mesh)


def _mesh(stage: int, fsdp: int = 1, tensor: int = 1, context: int = 1) -> jax.sharding.Mesh:
  sizes = {
    "stage": stage, "data": 1, "fsdp": fsdp, "context": context, "expert": 1, "tensor": tensor
  }  # fmt: skip
  devices = jax.devices()[: stage * fsdp * tensor * context]
  return mesh_lib.make_mesh(ml_collections.ConfigDict(sizes), devices)


def _packed_batch() -> dict[str, jax.Array]:
  """Eight rows of two or three documents, one with padding (segment 0, weight 0)."""
  rng = np.random.default_rng(0)
  segments = np.ones((8, LENGTH), np.int32)
  segments[:, 13:] = 2
  segments[::3, 25:] = 3
  segments[1, 28:] = 0
  starts = np.where(segments == 1, 0, np.where(segments == 2, 13, 25))
  tokens = rng.integers(1, 64, (8, LENGTH + 1))
  return {
    "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
    "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
    "positions": jnp.asarray(np.where(segments > 0, np.arange(LENGTH) - starts, 0), jnp.int32),
    "segment_ids": jnp.asarray(segments),
    "weights": jnp.asarray(segments > 0, jnp.float32),
  }


@functools.cache
def _params():
  """The unsharded parameters, created once outside any mesh."""
  return nnx.split(models.Transformer(CFG, rngs=nnx.Rngs(params=0)), nnx.Param)[1]


def _loss_and_grads(cfg, batch):
  """The train step's mean loss and gradients (train/step.py), and the compiled program's text."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))))
  fn = functools.partial(step_lib.gradients, graphdef=graphdef, microbatches=1, chunk=0)
  compiled = jax.jit(lambda p, b: fn(p, batch=b)[0:3:2]).lower(_params(), batch).compile()
  return compiled(_params(), batch), compiled.as_text()


@functools.cache
def _reference():
  return _loss_and_grads(CFG, _packed_batch())[0]


@pytest.mark.parametrize(
  "stage, fsdp, tensor, microbatches, repeats, context",
  [
    (2, 1, 1, 2, 1, ""),
    (4, 1, 1, 2, 1, ""),  # GPipe: fewer microbatches than stages
    (2, 2, 2, 4, 1, ""),
    (2, 1, 1, 2, 2, ""),
    (2, 2, 1, 4, 2, ""),
    (2, 2, 1, 2, 1, "ring"),  # each stage's rows split over a context axis of 2 as well
    (2, 1, 1, 2, 2, "all_gather"),
  ],
  ids=[
    "gpipe2",
    "gpipe4_m2",
    "gpipe2xfsdp2xtensor2_m4",
    "circular2_r2",
    "circular2xfsdp2_m4_r2",
    "gpipe2xfsdp2xcontext2_ring",
    "circular2xcontext2_r2_all_gather",
  ],
)
def test_pipeline_equals_the_unpipelined_model(stage, fsdp, tensor, microbatches, repeats, context):
  ref_loss, ref_grads = _reference()
  cfg = dataclasses.replace(CFG, pipeline_microbatches=microbatches, pipeline_repeats=repeats)
  if context:
    cfg = dataclasses.replace(cfg, attention_context=context)
  mesh = _mesh(stage, fsdp, tensor, context=2 if context else 1)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    assert pipeline.stages() == stage
    (loss, grads), program = _loss_and_grads(cfg, _packed_batch())
  # The stages pass activations to each other (a rotation the compiler makes collective permutes).
  assert "collective-permute(" in program
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  paths = jax.tree_util.tree_leaves_with_path(grads)
  for (path, got), want in zip(paths, jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(
      np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    )


def test_the_bubble_follows_the_schedule():
  assert pipeline.bubble(1, 4) == 0.0
  assert pipeline.bubble(4, 4) == pytest.approx(3 / 7)  # GPipe: (S - 1) / (M + S - 1)
  assert pipeline.bubble(4, 16) == pytest.approx(3 / 19)
  assert pipeline.bubble(4, 4, repeats=2) == pytest.approx(3 / 11)  # circular: R·M ticks of work
  assert pipeline.resolve_microbatches(-1, 4) == 4


def _validate(**overrides):
  config = tiny.get_config()
  config.mesh.stage, config.mesh.fsdp = 2, 4
  for key, value in overrides.items():
    group, name = key.split(".")
    config[group][name] = value
  return config_lib.validate(config, devices=jax.devices())


def test_bad_pipeline_settings_are_refused_before_any_work():
  resolved = _validate()  # tiny's two layers over two stages, one microbatch each: accepted
  assert resolved.mesh.shape["stage"] == 2 and resolved.model_cfg.pipeline_microbatches == -1
  # GPipe reads each microbatch once: fewer microbatches than stages run (a larger bubble).
  assert _validate(**{"pipeline.microbatches": 1}).model_cfg.pipeline_microbatches == 1
  refusals = {
    "model.num_layers=3 is not divisible by 2 stages × pipeline.repeats=1": {"model.num_layers": 3},
    "model.num_layers=2 is not divisible by 2 stages × pipeline.repeats=2": {"pipeline.repeats": 2},
    r"pipeline.microbatches=1 is fewer than the 2 stages with pipeline.repeats=2": {
      "pipeline.microbatches": 1,
      "pipeline.repeats": 2,
      "model.num_layers": 4,
    },
    r"pipeline.microbatches=4 does not cut the 8 rows .* the 4 data-parallel shards": {
      "pipeline.microbatches": 4
    },
    r"pipeline.repeats=0 must be a positive integer": {"pipeline.repeats": 0},
    r"set model.scan_layers=True": {"model.scan_layers": False},
    r"model.moe.num_experts=4; use mesh.stage=1": {"model.moe": _moe(4)},
    r"mesh.stage=2 but mesh.rules splits the stacked 'layers' over \(\)": {
      "mesh.rules": tuple(r for r in RULES if r[0] != "layers")
    },
  }
  for message, overrides in refusals.items():
    with pytest.raises(config_lib.ConfigError, match=message):
      _validate(**overrides)


def test_task_scoring_on_a_training_mesh_takes_whole_microbatches_and_context_shards():
  """In-training tasks score on the training mesh: rows rounded up to whole pipeline
  microbatches of whole data shards (harness.batch_size=1 under 2 stages had cut 1 row into 2
  microbatches, a crash at the first eval), lengths to what the context axis divides."""
  cases = [  # (stage, fsdp, context, pipeline.microbatches, harness.batch_size) -> rows, multiple
    ((2, 1, 1, -1, 1), 2, 128),
    ((2, 2, 1, 3, 16), 18, 128),
    ((1, 2, 3, -1, 16), 16, 384),  # 128-token steps that a context of 3 divides
  ]
  for (stage, fsdp, context, micro, batch_size), rows, multiple in cases:
    cfg = dataclasses.replace(CFG, pipeline_microbatches=micro, max_seq_len=1536)
    mesh = _mesh(stage, fsdp, context=context)
    model = SimpleNamespace(model_cfg=cfg, mesh=mesh, rules=RULES, graphdef=None)
    scorer = harness.Scorer(model, batch_size=batch_size)
    assert scorer.batch == rows, (stage, fsdp, context)
    assert scorer._padded_length(100) == multiple and scorer._padded_length(400) % multiple == 0


def test_rules_that_split_the_layers_over_another_axis_are_refused():
  """Stages may span processes (each stage's processes read the same rows:
  tests/test_multiprocess.py), but only the stage axis may split the stacked layers."""
  rules = tuple(r for r in RULES if r[0] != "layers") + (("layers", ("stage", "fsdp")),)
  with pytest.raises(config_lib.ConfigError, match=r"the only axis that splits layers"):
    _validate(**{"mesh.rules": rules})


def _moe(experts: int) -> ml_collections.ConfigDict:
  moe = default.get_config().model.moe
  moe.num_experts = experts
  return moe


@pytest.mark.slow
def test_a_staged_run_resumes_bitwise_and_its_checkpoints_do_not_depend_on_the_schedule(
  tiny_reference, tmp_path, cache_dir
):
  """The tiny run with two stages: from the reference's step-10 checkpoint (written without
  stages) to step 20 with the one-device losses; resumed again from its own step 10 bit for bit,
  an lm-eval task scored at its final eval as on the unstaged checkpoint; its step-20 checkpoint
  (written with stages) scored and sampled alike with and without them."""
  staged = str(tmp_path / "staged")
  args = ("--config.mesh.stage=2", "--config.pipeline.microbatches=2")
  result = resume_from_step_10(tiny_reference, staged, *args, cache_dir=cache_dir)
  assert "pipeline: 2 stages, 2 microbatches" in result.stderr
  expected, got = (train_losses(read_metrics(w)) for w in (tiny_reference, staged))
  assert sorted(got) == sorted(expected)
  steps = sorted(got)
  np.testing.assert_allclose([got[s] for s in steps], [expected[s] for s in steps], rtol=2e-5)
  report = json.load(open(os.path.join(staged, "report.json")))
  bubble = pytest.approx(1 / 3, abs=1e-4)  # report.json rounds it to 4 places
  assert report["pipeline"] == {
    "stages": 2, "microbatches": 2, "repeats": 1, "ticks": 3, "bubble": bubble
  }  # fmt: skip

  # Again from its own step 10, bit for bit, with an lm-eval task at the final eval (scored on the
  # training mesh, stages and all).
  again = str(tmp_path / "again")
  tasks = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness_tasks")
  harness_args = (
    "--config.harness.tasks=('loom_python_mc',)",
    f"--config.harness.include_path={tasks}",
    "--config.harness.limit=8",
  )
  resume_from_step_10(staged, again, *args, *harness_args, cache_dir=cache_dir)
  records = read_metrics(again)
  assert train_losses(records) == got
  final = [r for r in records if "harness/loom_python_mc/acc" in r]
  assert [r["step"] for r in final] == [20], final
  in_training = {k: v for k, v in final[0].items() if k.startswith("harness/")}

  # Inference runs the layers in order (loading folds the stages into fsdp): the staged run's
  # step-20 checkpoint scores and samples as the unstaged reference's, whose losses it matched.
  model, scores, sample = scores_and_greedy_text(staged)
  assert model.step == 20 and model.mesh.shape["stage"] == 1
  _, want_scores, want_sample = scores_and_greedy_text(tiny_reference)
  np.testing.assert_allclose(scores, want_scores, rtol=1e-3)
  assert sample.texts == want_sample.texts and sample.texts[0]
  # The task scored during training on the staged mesh, as on the loaded, unstaged checkpoint.
  results = harness.run_tasks(model, ["loom_python_mc"], include_path=tasks, limit=8, seed=0)
  assert {k: v for k, v in results["metrics"].items() if k in in_training} == in_training
