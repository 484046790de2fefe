"""``python -m train.bench_gpu``: the GPU suite, for the day a GPU is lent. One JSON line per case.

On a machine with one or more NVIDIA GPUs it measures the train step of gpt2_small and llama_1b
at rows of 2048 packed tokens, XLA against cuDNN attention and bf16 against fp8 projections:
tokens/s, MFU against the datasheet dense bf16 peak (``train/meter/hardware.py``; fp8 runs are
quoted against the same bf16 peak, as torchtitan does, so the two are comparable), compile time,
the compiled program's memory and the kernels found in it (cuDNN fused attention, cuBLASLt fp8
GEMMs). First it checks that cuDNN attention on packed rows equals the XLA reference (loss and
gradients). Everything is bounded by ``--budget_s`` (default 420 s): cases that would start after
it are reported as skipped, never silently dropped.

It reads no data (synthetic packed rows) and runs where TensorFlow is not installed (the
input_pipeline package then loads its exports on first use): an accelerator image that has JAX,
Flax, Optax and ml_collections will do.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from configs import gpt2_small, llama_1b
from models import quant as quant_lib
from models.config import ModelConfig
from train import programs as programs_lib
from train import state as state_lib
from train.cluster import mesh as mesh_lib
from train.meter import flops, gemms, hardware

CONFIGS = {"gpt2_small": (gpt2_small, 16), "llama_1b": (llama_1b, 8)}  # name: (module, batch)
SEQ_LEN = 2048
# Most telling first: a budget that runs out cuts the least.
DEFAULT_CASES = (
  "cudnn_equality", "gpt2_small:xla:none", "gpt2_small:cudnn:none", "gpt2_small:cudnn:fp8",
  "llama_1b:xla:none", "llama_1b:cudnn:none", "llama_1b:cudnn:fp8",
  "gpt2_small:xla:fp8", "llama_1b:xla:fp8", "gpt2_small:cudnn:int8",
)  # fmt: skip
KERNEL_MARKERS = {  # custom-call targets worth naming in a compiled GPU program
  "cudnn_attention": r"__cudnn\$fmha",
  "fp8_gemm": r"__cublas\$lt\$matmul\$f8",
  "cublas_gemm": r"__cublas\$(?:lt\$)?(?:matmul|gemm)(?!\$f8)",
  "triton_gemm": r"__triton_(?:nested_)?gemm",  # jaxlib 0.10: __triton_nested_gemm_fusion
}


def kernels_in(hlo: str) -> dict[str, int]:
  """How many times each kind of kernel in ``KERNEL_MARKERS`` is called in compiled HLO text."""
  return {name: len(re.findall(pattern, hlo)) for name, pattern in KERNEL_MARKERS.items()}


def packed_rows(batch: int, length: int, mean_doc: int, vocab: int, seed: int = 0) -> dict:
  """A batch of rows packed with documents of random lengths (mean ``mean_doc``), as the
  input pipeline packs them: positions restart and segment ids count up within each row."""
  rng = np.random.default_rng(seed)
  segment_ids = np.zeros((batch, length), np.int32)
  positions = np.zeros((batch, length), np.int32)
  for b in range(batch):
    at, seg = 0, 1
    while at < length:
      n = min(int(rng.exponential(mean_doc)) + 1, length - at)
      segment_ids[b, at : at + n] = seg
      positions[b, at : at + n] = np.arange(n)
      at, seg = at + n, seg + 1
  tokens = rng.integers(0, vocab, (batch, length + 1), dtype=np.int32)
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "positions": positions,
    "segment_ids": segment_ids,
    "weights": np.ones((batch, length), np.float32),
  }


def case_config(name: str, attention: str, quant: str, shrink: dict | None = None):
  """The named config at rows of SEQ_LEN; ``shrink`` (the tests, on a CPU) overrides seq_len,
  batch and num_layers, and marks the quantisation as the emulation it then is."""
  module, batch = CONFIGS[name]
  config = module.get_config()
  shrink = shrink or {}
  config.data.seq_len = shrink.get("seq_len", SEQ_LEN)
  config.train.batch_size = shrink.get("batch", batch)
  config.model.num_layers = shrink.get("num_layers", config.model.num_layers)
  config.model.quant_emulation = bool(shrink)
  config.model.attention = attention
  config.model.quant = quant
  return config


def model_config(config) -> ModelConfig:
  return ModelConfig.from_config(
    config.model, seq_len=config.data.seq_len, vocab_size=config.model.vocab_size
  )


def run_case(
  name: str, attention: str, quant: str, steps: int, warmup: int, shrink: dict | None = None
) -> dict:
  """Compiles and times one train step configuration on the local devices."""
  config = case_config(name, attention, quant, shrink)
  length = config.data.seq_len
  model_cfg = model_config(config)
  hardware.check_quant(model_cfg.quant, model_cfg.quant_emulation, jax.devices()[0])
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  programs = programs_lib.jit_programs(config, mesh, rules, model_cfg)
  start = time.perf_counter()
  compiled = programs.compile_train_step()
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  memory = compiled.memory_analysis()
  state = state_lib.init_state(programs.spec, model_cfg, programs.tx, mesh, rules, config.seed)
  rows = packed_rows(config.train.batch_size, length, 600, model_cfg.vocab_size)
  batch = jax.device_put(rows, programs.batch_sharding)
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps
  tokens_per_s = config.train.batch_size * length / step_s
  per_token = flops.train_flops_per_token(model_cfg, length)
  peak = hardware.datasheet_peak(jax.devices()[0], model_cfg.dtype)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "tokens_per_second": round(tokens_per_s),
    "step_time_s": step_s,
    "mfu": per_token * tokens_per_s / (peak * jax.device_count()) if peak else None,
    "flops_per_token": per_token,
    "peak_flops_per_device": peak,
    "compile_time_s": round(compile_s, 1),
    "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
    "argument_bytes": getattr(memory, "argument_size_in_bytes", None),
    "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    "kernels": kernels_in(hlo),
    "custom_calls": dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))),
    # By their operands: a Triton GEMM on fp8 operands has no custom call (train/meter/gemms.py).
    "low_precision_gemms": gemms.low_precision_counts(gemms.low_precision_gemms(hlo)),
    "batch": config.train.batch_size,
    "seq_len": length,
    "final_loss": float(metrics["train/loss"]),
  }


def equality_check(length: int = 512) -> dict:
  """cuDNN attention on packed rows against the XLA reference: loss and gradients of a small
  bf16 model (the GPU half of tests/test_attention.py's kernel tests)."""
  base = model_config(case_config("llama_1b", "xla", "none"))
  cfg = dataclasses.replace(
    base, vocab_size=512, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
    mlp_dim=512, max_seq_len=length, scan_layers=False, remat="none",
  )  # fmt: skip
  rows = packed_rows(4, length, 100, cfg.vocab_size, seed=1)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}

  def loss_and_grads(attention: str):
    graphdef, params = nnx.split(
      models.Transformer(dataclasses.replace(cfg, attention=attention), rngs=nnx.Rngs(params=0)),
      nnx.Param,
    )

    def loss(p):
      model = nnx.merge(graphdef, p)
      logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      picked = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
      return -jnp.mean(picked)

    fn = jax.jit(jax.value_and_grad(loss))
    hlo = fn.lower(params).compile().as_text()
    value, grads = fn(params)
    return float(value), jax.tree.leaves(grads), kernels_in(hlo)

  ref_loss, ref_grads, _ = loss_and_grads("xla")
  got_loss, got_grads, found = loss_and_grads("cudnn")
  worst = max(
    float(
      jnp.linalg.norm((g - r).astype(jnp.float32))
      / (jnp.linalg.norm(r.astype(jnp.float32)) + 1e-12)
    )
    for g, r in zip(got_grads, ref_grads, strict=True)
  )
  loss_rel = abs(got_loss - ref_loss) / abs(ref_loss)
  return {
    "loss_xla": ref_loss,
    "loss_cudnn": got_loss,
    "loss_relative_error": loss_rel,
    "worst_gradient_relative_error": worst,
    "kernels": found,
    "equal": bool(loss_rel < 2e-2 and worst < 5e-2 and found["cudnn_attention"] > 0),
  }


def fp8_gemm_forms(size: int = 4096) -> dict:
  """Which ways of writing a scaled fp8 matmul the GPU compiler turns into an fp8 GEMM: for each
  form, the custom calls in its compiled program and its time (a diagnosis, not a training case)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (size, size), jnp.bfloat16)
  w = jax.random.normal(k2, (size, size), jnp.bfloat16)
  e4 = jnp.float8_e4m3fn
  s = jnp.float32(0.5)

  def dq(a, dtype):
    return (a / s.astype(a.dtype)).astype(e4).astype(dtype) * s.astype(dtype)

  forms = {
    "loom_fp8": lambda a, b: quant_lib.matmul(a, b, "fp8"),
    "qdq_bf16_out_bf16": lambda a, b: dq(a, jnp.bfloat16) @ dq(b, jnp.bfloat16),
    "qdq_f32_out_f32": lambda a, b: dq(a, jnp.float32) @ dq(b, jnp.float32),
    "qdq_bf16_out_f32": lambda a, b: jax.lax.dot(
      dq(a, jnp.bfloat16), dq(b, jnp.bfloat16), preferred_element_type=jnp.float32
    ),
    "f8_operands_direct": lambda a, b: jax.lax.dot(
      a.astype(e4), b.astype(e4), preferred_element_type=jnp.bfloat16
    ),
    "bf16_reference": lambda a, b: a @ b,
  }
  out = {}
  for name, fn in forms.items():
    try:
      compiled = jax.jit(fn).lower(x, w).compile()
      hlo = compiled.as_text()
      compiled(x, w).block_until_ready()
      start = time.perf_counter()
      for _ in range(20):
        y = compiled(x, w)
      y.block_until_ready()
      seconds = (time.perf_counter() - start) / 20
      calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
      out[name] = {"tflops": round(2 * size**3 / seconds / 1e12), "custom_calls": dict(calls)}
    except Exception as e:  # noqa: BLE001
      out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  return {"forms": out}


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.bench_gpu", description=__doc__)
  parser.add_argument(
    "--cases", default=",".join(DEFAULT_CASES), help="config:attention:quant, comma-separated"
  )
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--budget_s", type=float, default=420.0)
  parser.add_argument(
    "--shrink", default="", help="seq_len,batch,num_layers: tiny shapes, e.g. for a CPU check"
  )
  args = parser.parse_args(argv)
  begun = time.perf_counter()
  # The largest cases need more than the 75% of a GPU JAX preallocates by default (gpt2_small's
  # XLA scores: 116.5 GiB on an H200); set before the first call starts the GPU backend.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  device = jax.devices()[0]
  _emit({
    "case": "environment", "platform": device.platform, "device_kind": device.device_kind,
    "devices": jax.device_count(), "jax": jax.__version__, "python": sys.version.split()[0],
  })  # fmt: skip
  shrink = None
  if args.shrink:
    try:
      shrink = dict(
        zip(("seq_len", "batch", "num_layers"), map(int, args.shrink.split(",")), strict=True)
      )
    except ValueError:
      print(
        f"loom: error: --shrink={args.shrink!r} must be three integers: seq_len,batch,num_layers",
        file=sys.stderr,
      )
      return 2
  if device.platform != "gpu" and not shrink:
    print(
      f"loom: error: no GPU here (platform {device.platform}); this suite needs one",
      file=sys.stderr,
    )
    return 2
  plan = [(case.split(":") + [None, None])[:3] for case in args.cases.split(",")]
  failures = 0
  for name, attention, quant in plan:
    record = {"case": name, "attention": attention, "quant": quant}
    elapsed = time.perf_counter() - begun
    if elapsed > args.budget_s:
      _emit({**record, "skipped": f"the {args.budget_s:.0f} s budget was spent ({elapsed:.0f} s)"})
      continue
    try:
      if name == "fp8_gemm_forms":
        record.update(fp8_gemm_forms())
      elif name == "cudnn_equality":
        record.update(equality_check())
        failures += not record["equal"]
      else:
        record.update(run_case(name, attention, quant, args.steps, args.warmup, shrink))
    except Exception as e:  # noqa: BLE001 (one case's failure is reported; the rest still run)
      if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
        # A case larger than this GPU (gpt2_small's XLA scores: 116.5 GiB of temporaries, more
        # than an H100 has) is not a failure of the code: said, and the suite goes on.
        record["skipped"] = f"does not fit in this GPU's memory: {str(e)[:300]}"
      else:
        failures += 1
        record["error"] = f"{type(e).__name__}: {str(e)[:600]}"
      record["where"] = traceback.format_exc().splitlines()[-3:]
    record["elapsed_s"] = round(time.perf_counter() - begun, 1)
    _emit(record)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
