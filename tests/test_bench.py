"""python -m train.bench on its own default config (R), as docs/speed.md tells users to run it, and
its matmul floor (``--what matmuls``)."""

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import REPO, train_env
from model_configs import model_config


def _bench(*flags: str) -> dict:
  """Runs ``python -m train.bench`` (config R) on one CPU device, as a user's plain run has;
  returns the JSON line it prints last."""
  result = subprocess.run(
    [sys.executable, "-m", "train.bench", *flags],
    cwd=REPO, env=train_env(devices=1, user_compile=True), capture_output=True, text=True,
    timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_runs_config_r_and_prints_its_json():
  # R's 256 ids are fed synthetic tokens.
  report = _bench("--steps=1", "--warmup=0")
  assert report["config"]["model"]["vocab_size"] == 256 and report["tokens_per_second"] > 0
  assert report["peak_source"].startswith("measured")


def test_a_given_peak_is_refused_where_there_is_none_to_take(monkeypatch):
  """--peak=given takes LOOM_CPU_PEAK_FLOPS, a float32 figure: refused, before anything compiles,
  where it is unset or the config computes in another dtype (tests/test_profile.py and the
  two-process bench in tests/test_multiprocess.py run with the session's)."""
  from configs import tiny
  from input_pipeline.host.command import LoomError
  from train.bench import check_peak
  from train.meter import flops

  config = tiny.get_config()
  check_peak("given", config)  # the session gives one (tests/conftest.py)
  config.model.dtype = "bfloat16"
  with pytest.raises(LoomError, match="float32 matmul peak and model.dtype='bfloat16'"):
    check_peak("given", config)
  check_peak("measure", config)
  config.model.dtype = "float32"
  monkeypatch.delenv(flops.PEAK_VARIABLE)
  with pytest.raises(LoomError, match=f"--peak=given: {flops.PEAK_VARIABLE} is not set"):
    check_peak("given", config)
  check_peak("measure", config)
  monkeypatch.setenv(flops.PEAK_VARIABLE, "fast")
  with pytest.raises(LoomError, match="'fast': must be a positive number"):
    check_peak("given", config)


@pytest.mark.parametrize("mlp, tie", [("gelu", True), ("swiglu", True), ("swiglu", False)])
def test_step_matmuls_are_the_flops_the_meter_counts(mlp, tie):
  """The meter's FLOPs per token against the step's own dots: one output projection, tied to
  the embedding or not (an untied one is among the non-embedding parameters already)."""
  from train.bench import step_matmuls
  from train.meter import flops

  cfg = model_config(
    vocab_size=96, d_model=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
    mlp_dim=160, mlp=mlp, max_seq_len=48, attention_block=0, tie_embeddings=tie,
  )  # fmt: skip
  batch, length = 2, 48

  def total(dots):
    return sum(2 * int(np.prod(b, dtype=np.int64)) * m * k * n for b, m, k, n, *_ in dots)

  counted = flops.train_flops_per_token(cfg, length) * batch * length
  whole_rows = total(step_matmuls(cfg, batch, length))
  # The meter counts norm scales as matmul weights too: a few per mille here.
  assert counted * 0.99 < whole_rows <= counted
  blocked = total(step_matmuls(dataclasses.replace(cfg, attention_block=16), batch, length))
  attention = 3 * flops.attention_flops_per_token(cfg, length) * batch * length
  # Query blocks of 16 over 48 keys skip the key blocks above the diagonal: (1+2+3)/9 remain.
  assert blocked == whole_rows - attention + attention * 6 // 9


def test_bench_matmuls_times_the_steps_dots_alone():
  from configs import bench_r, tiny
  from train import config as config_lib
  from train.bench import bench_matmuls, step_matmuls

  # Config R's step: 6 layers × 6 projections × 3 dots, the unembedding's 3, 4 query blocks ×
  # 6 × 6 (counted; timing R's 255 dots takes a minute of compiling here).
  r = bench_r.get_config()
  r_cfg = config_lib.validate(r, with_tokenizer=False).model_cfg
  assert len(step_matmuls(r_cfg, r.train.batch_size, r.data.seq_len)) == 6 * 6 * 3 + 3 + 4 * 6 * 6
  # Timed as `--what=matmuls --steps=1` times them, on the tiny config: 2 layers × 7 projections
  # (SwiGLU) × 3 dots, the unembedding's 3, one query block (64 >= 32 positions) × 6 × 2.
  report = bench_matmuls(tiny.get_config(), repeats=1)
  assert report["matmuls"] == 2 * 7 * 3 + 3 + 1 * 6 * 2
  assert report["matmul_time_s"] > 0 and report["tokens_per_second_bound"] > 0


def test_the_gpu_suite_refuses_a_cpu_and_runs_its_cases_shrunk(capsys):
  """``python -m train.bench_gpu``: one JSON line per case; on a CPU only with --shrink (the
  quantisation then runs as the emulation it is there)."""
  from train import bench_gpu

  assert bench_gpu.main([]) == 2
  assert "this suite needs one" in capsys.readouterr().err
  argv = ["--shrink", "64,8,1", "--cases", "gpt2_small:xla:int8", "--steps", "1", "--warmup", "0"]
  assert bench_gpu.main(argv) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["case"] for r in lines] == ["environment", "gpt2_small"]
  case = lines[1]
  assert case["quant"] == "int8" and case["seq_len"] == 64 and case["tokens_per_second"] > 0
  assert "error" not in case and math.isfinite(case["final_loss"])
  # How many int8 dots the CPU keeps depends on its compiler (on 8 CPU devices it widens the
  # operands to int32 before the dots); an int8 run has no fp8 GEMM.
  assert set(case["low_precision_gemms"]) == {"fp8", "int8"}
  assert case["low_precision_gemms"]["fp8"] == 0
  hlo = 'custom_call_target="__cudnn$fmhaSoftmax" custom_call_target="__cublas$lt$matmul$f8"'
  assert bench_gpu.kernels_in(hlo) == {
    "cudnn_attention": 1, "fp8_gemm": 1, "cublas_gemm": 0, "triton_gemm": 0
  }  # fmt: skip


def test_the_gpu_suite_imports_on_a_host_without_tensorflow():
  """The lent accelerator image has JAX, Flax and Optax but no TensorFlow: the suite's modules
  (the model, the train step, its programs) must import there; reading data then names TF."""
  script = (
    "import sys; sys.modules['tensorflow'] = None\n"
    "from train import bench_gpu\n"
    "import input_pipeline\n"
    "assert input_pipeline.DataError and input_pipeline.to_global\n"
    "try:\n"
    "  input_pipeline.build\n"
    "except ImportError as e:\n"
    "  print('refused:', e)\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "refused:" in result.stdout and "tensorflow" in result.stdout
