"""Causal attention by blocks of queries equals whole-row attention (values and gradients)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_configs import model_config

import models

CFG = model_config(
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

  # Jitted: op by op, the blocked graph's many small ops took minutes on two cores.
  ref, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(graphdef, p)))(params)
  got, grads = jax.jit(jax.value_and_grad(lambda p: loss(blocked_def, p)))(params)
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


# --- attention kernels (models/attention.py): splash in Pallas interpret mode on the CPU ---

KERNEL_CFG = dataclasses.replace(
  CFG, max_seq_len=128, num_heads=4, num_kv_heads=2, head_dim=16, d_model=64, attention="xla"
)


def _packed_batch(rows: int = 4, length: int = 128):
  """Rows of three documents with uneven edges (not on 128-token blocks) and padding at the end
  of every other row (segment id 0), as the packer makes them."""
  tokens = jax.random.randint(jax.random.key(3), (rows, length), 0, CFG.vocab_size)
  cuts = np.array([37, 90, 117])
  segments = np.searchsorted(cuts, np.arange(length), "right") + 1
  segments = np.stack([segments] * rows)
  segments[1::2, 117:] = 0  # padding
  starts = np.concatenate([[0], cuts])[np.clip(segments - 1, 0, 3)]
  positions = np.where(segments > 0, np.arange(length) - starts, 0)
  return tokens, jnp.asarray(positions), jnp.asarray(segments, jnp.int32)


def _loss_and_grads(cfg, tokens, positions, segments):
  graphdef, params = nnx.split(models.Transformer(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
  weights = (segments > 0).astype(jnp.float32)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens, positions, segments)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
    return jnp.sum(nll * weights) / jnp.sum(weights)

  return jax.jit(jax.value_and_grad(loss))(params)


def _assert_same(got, ref):
  (loss, grads), (ref_loss, ref_grads) = got, ref
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_splash_attention_equals_the_reference_on_packed_rows():
  batch = _packed_batch()
  reference = _loss_and_grads(KERNEL_CFG, *batch)
  splash = dataclasses.replace(KERNEL_CFG, attention="splash")
  _assert_same(_loss_and_grads(splash, *batch), reference)
  # The kernel path builds no [B, L, L] mask; the reference does.
  tokens, positions, segments = batch

  def program(cfg):
    graphdef, params = nnx.split(models.Transformer(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
    forward = lambda p: nnx.merge(graphdef, p)(tokens, positions, segments)  # noqa: E731
    return str(jax.make_jaxpr(forward)(params))

  assert "bool[4,128,128]" not in program(splash)
  assert "bool[4,128,128]" in program(KERNEL_CFG)


@pytest.mark.parametrize("kv_rule", ["tensor", None])
def test_splash_attention_sharded_over_batch_and_heads_equals_the_reference(kv_rule):
  """On a 2 × 2 × 2 mesh (data, fsdp, tensor): rows split over data × fsdp, query heads over
  tensor; key/value heads split with them, or (kv_rule None) replicated and repeated per head."""
  from jax.sharding import Mesh

  from configs import default

  batch = _packed_batch()
  reference = _loss_and_grads(KERNEL_CFG, *batch)
  rules = tuple(
    (name, kv_rule if name == "kv_heads" else (tuple(a) if isinstance(a, list | tuple) else a))
    for name, a in default.get_config().mesh.rules
  )
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  splash = dataclasses.replace(KERNEL_CFG, attention="splash")
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    got = _loss_and_grads(splash, *batch)
    jaxpr = str(jax.make_jaxpr(lambda: _loss_and_grads(splash, *batch))())
  assert "shard_map" in jaxpr
  _assert_same(got, reference)


def test_cudnn_runs_are_the_packed_segments():
  """cuDNN's ragged form of packed rows (offsets, lengths) says exactly which tokens share a
  sequence: rebuilt as a mask, it is the reference's segment mask on every real token."""
  from models.attention import causal_segment_mask, segment_runs

  _, _, segments = _packed_batch(length=24)
  segments = segments.at[0].set(jnp.arange(24) // 2 + 1)  # twelve two-token documents
  lengths, offsets = segment_runs(segments, 24)
  lengths, offsets = np.asarray(lengths), np.asarray(offsets)
  rows, length = segments.shape
  for b in range(rows):
    runs = int((lengths[b] > 0).sum())
    assert (lengths[b, runs:] == -1).all() and (offsets[b, runs:] == -1).all()
    assert offsets[b, 0] == 0 and lengths[b, :runs].sum() == length
    run_of = np.zeros(length, int)
    for m in range(runs):
      run_of[offsets[b, m] : offsets[b, m] + lengths[b, m]] = m
    same_run = run_of[:, None] == run_of[None, :]
    causal = np.tril(np.ones((length, length), bool))
    expected = np.asarray(causal_segment_mask(segments[b : b + 1], length))[0]
    real = np.asarray(segments[b]) > 0
    np.testing.assert_array_equal((same_run & causal)[real], expected[real])
  assert int((lengths[0] > 0).sum()) == 12


def test_auto_picks_the_kernel_per_platform_and_explicit_choices_are_checked():
  from models.attention import implementation

  bf16 = jnp.bfloat16
  assert implementation("auto", bf16, 1024, "gpu") == "cudnn"
  assert implementation("auto", jnp.float32, 1024, "gpu") == "xla"  # cuDNN: half precision only
  assert implementation("auto", bf16, 1024, "tpu") == "splash"
  assert implementation("auto", bf16, 1000, "tpu") == "xla"  # not a multiple of 128
  assert implementation("auto", jnp.float32, 1024, "cpu") == "xla"
  assert implementation("splash", jnp.float32, 256, "cpu") == "splash"  # interpreted
  with pytest.raises(ValueError, match=r"model.attention='cudnn' needs a GPU"):
    implementation("cudnn", bf16, 1024, "cpu")
  with pytest.raises(ValueError, match=r"data.seq_len=1000"):
    implementation("splash", bf16, 1000, "tpu")
  with pytest.raises(ValueError, match=r"model.attention='flash' is not one of"):
    dataclasses.replace(KERNEL_CFG, attention="flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (cuDNN)")
def test_cudnn_attention_equals_the_reference_on_packed_rows_on_a_gpu():
  batch = _packed_batch()
  reference = _loss_and_grads(dataclasses.replace(KERNEL_CFG, dtype="bfloat16"), *batch)
  cudnn = dataclasses.replace(KERNEL_CFG, dtype="bfloat16", attention="cudnn")
  loss, grads = _loss_and_grads(cudnn, *batch)
  np.testing.assert_allclose(float(loss), float(reference[0]), rtol=2e-2)
  graphdef, params = nnx.split(models.Transformer(cudnn, rngs=nnx.Rngs(params=0)), nnx.Param)
  hlo = jax.jit(lambda p: nnx.merge(graphdef, p)(*batch)).lower(params).compile().as_text()
  assert "__cudnn$fmha" in hlo
