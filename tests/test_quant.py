"""Low-precision projections (models/quant.py): numerics, programs, hardware checks, training."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import copy_run, read_metrics, train_in_process, train_losses

from models import quant
from models.attention import check_runs, runs_per_row, segment_runs
from models.layers import dense
from train import config as config_lib
from train.meter import hardware


def _operands(t=512, i=256, o=128):
  k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(k1, (t, i), jnp.float32)
  w = jax.random.normal(k2, (i, o), jnp.float32) * 0.05
  dy = jax.random.normal(k3, (t, o), jnp.float32)
  return x, w, dy


def _forward_and_grads(fmt, x, w, dy):
  y, vjp = jax.vjp(lambda a, b: quant.matmul(a, b, fmt), x, w)
  return (y, *vjp(dy))


def _relative(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# Expected relative errors of a dot of Gaussian operands: e4m3 keeps 3 mantissa bits (rounding
# error up to 2^-4, ~3.6% rms per element), e5m2 2 bits (~7%); int8 per channel ~0.4% per element.
BOUNDS = {
  "fp8": {"y": 0.05, "dx": 0.08, "dw": 0.08},
  "int8": {"y": 0.015, "dx": 0.015, "dw": 0.015},
}


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_a_quantised_matmul_and_its_gradients_are_within_the_recipes_error(fmt):
  x, w, dy = _operands()
  reference = _forward_and_grads("none", x, w, dy)
  got = _forward_and_grads(fmt, x, w, dy)
  for name, a, b in zip(("y", "dx", "dw"), got, reference, strict=True):
    error = _relative(a, b)
    assert 0 < error < BOUNDS[fmt][name], (name, error)  # really rounded, and not by too much


def test_fp8_rounds_through_float8_and_int8_multiplies_int8_into_int32():
  x, w, _ = _operands(64, 32, 16)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

  def program(fmt):
    loss = lambda a, b: quant.matmul(a, b, fmt).astype(jnp.float32).sum()  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(xb, wb).as_text()

  fp8 = program("fp8")
  assert fp8.count("f8E4M3FN") >= 4 and "f8E5M2" in fp8  # e4m3 operands, e5m2 gradients
  int8 = program("int8")
  dots = [line for line in int8.splitlines() if "dot_general" in line]
  assert len(dots) == 3 and all("tensor<" in d and "xi8>" in d and "xi32>" in d for d in dots)


def test_dense_with_quant_matches_its_merged_matmul_and_keeps_the_shapes():
  x_BLD = jax.random.normal(jax.random.key(1), (2, 8, 16), jnp.float32)
  kernel_DNH = jax.random.normal(jax.random.key(2), (16, 4, 8), jnp.float32)
  y = dense(x_BLD, kernel_DNH, quant="int8")
  assert y.shape == (2, 8, 4, 8)
  expected = quant.matmul(x_BLD.reshape(16, 16), kernel_DNH.reshape(16, 32), "int8")
  np.testing.assert_array_equal(np.asarray(y).reshape(16, 32), np.asarray(expected))
  with pytest.raises(ValueError, match="kernel_axes"):
    dense(x_BLD, kernel_DNH.reshape(16, 32).T, kernel_axes=(1,), quant="fp8")


def _device(platform, kind):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_a_quant_the_chips_cannot_run_is_refused_naming_what_would_work():
  hardware.check_quant("fp8", False, _device("gpu", "NVIDIA H100 80GB HBM3"))
  hardware.check_quant("int8", False, _device("tpu", "TPU v5 lite"))
  hardware.check_quant("fp8", True, _device("cpu", "cpu"))  # emulation asked for
  with pytest.raises(ValueError, match=r"model.quant='fp8': TPU v6e .*use model.quant='int8'"):
    hardware.check_quant("fp8", False, _device("tpu", "TPU v6 lite"))
  with pytest.raises(ValueError, match=r"A100 .*native there: int8"):
    hardware.check_quant("fp8", False, _device("gpu", "NVIDIA A100-SXM4-80GB"))
  with pytest.raises(ValueError, match=r"model.quant_emulation=True"):
    hardware.check_quant("int8", False, _device("cpu", "cpu"))
  # A GPU the table does not know is not said to lack the units (an H800 has fp8's).
  with pytest.raises(ValueError, match=r"NVIDIA H800\) is not in Loom's hardware table") as e:
    hardware.check_quant("fp8", False, _device("gpu", "NVIDIA H800"))
  assert "has no fp8" not in str(e.value) and "quant_emulation=True" in str(e.value)


def test_the_run_config_refuses_an_unnative_quant_and_an_unknown_one(cache_dir):
  from cli_helpers import tiny_config

  with pytest.raises(config_lib.ConfigError, match=r"model.quant='fp8'.*quant_emulation"):
    config_lib.validate(tiny_config(cache_dir, {"model.quant": "fp8"}))
  with pytest.raises(config_lib.ConfigError, match=r"model.quant='fp4' is not one of"):
    config_lib.validate(tiny_config(cache_dir, {"model.quant": "fp4"}))


def test_a_quantised_fine_tune_starts_from_a_run_in_any_precision(cache_dir, tiny_reference):
  """The projections' precision is the run's, as for Hugging Face weights: the parameters are the
  same in every precision, so a Loom source does not decide it."""
  from cli_helpers import tiny_config

  from train import init_from

  int8 = {"model.quant": "int8", "model.quant_emulation": True}
  adopted = init_from.adopt(
    tiny_config(cache_dir, {**int8, "checkpoint.init_from": f"loom:{tiny_reference}"})
  )
  assert (adopted.model.quant, adopted.model.quant_emulation) == ("int8", True)


def test_cudnn_runs_are_bounded_by_max_segments_and_a_fuller_row_is_refused():
  ids = np.repeat(np.arange(1, 9), 4)[None]  # eight 4-token documents in one 32-token row
  assert runs_per_row(ids).tolist() == [8]
  lengths, offsets = segment_runs(jnp.asarray(ids), 8)
  assert lengths.shape == (1, 8) and offsets.shape == (1, 9)
  assert np.asarray(lengths).tolist() == [[4] * 8]
  assert np.asarray(offsets).tolist() == [[0, 4, 8, 12, 16, 20, 24, 28, -1]]
  check_runs(ids, 8)
  with pytest.raises(ValueError, match=r"8 documents .* model.max_segments=4 .* at least 8"):
    check_runs(ids, 4)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_a_quantised_run_learns_like_the_unquantised_one_and_resumes_bit_for_bit(
  fmt, tmp_path, cache_dir, tiny_reference
):
  overrides = {"model.quant": fmt, "model.quant_emulation": True, "log.every": 1}
  workdir = str(tmp_path / "run")
  train_in_process(workdir, cache_dir, overrides)
  losses = train_losses(read_metrics(workdir))
  reference = train_losses(read_metrics(tiny_reference))
  assert losses != reference  # the projections really ran quantised
  last = max(reference)
  assert abs(losses[last] - reference[last]) / reference[last] < 0.02, (losses[last], reference)
  assert abs(_eval_loss(workdir) - _eval_loss(tiny_reference)) / _eval_loss(tiny_reference) < 0.02
  resumed = copy_run(workdir, tmp_path / "resumed", 20)
  assert train_in_process(resumed, cache_dir, overrides)["restarted_from_step"] == 10
  assert train_losses(read_metrics(resumed)) == losses


def _eval_loss(workdir):
  return [r["eval/loss"] for r in read_metrics(workdir) if "eval/loss" in r][-1]
