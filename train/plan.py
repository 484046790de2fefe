"""``python -m train.plan --config configs/X.py --topology v5p-128 [--tokens N] [--mfu 0.4]``.

Plans a run on a TPU slice without the slice: compiles the trainer's own train step ahead of time
for the slice's devices (libtpu's compile-only topology descriptions, on this CPU machine) and
reports what the compiler says it needs per chip, whether that fits the chip's HBM, the FLOPs of
one step, and — at a stated MFU, from the chip's documented bf16 peak and power
(``train/topology.py``) — the step time, the time to train N tokens and the energy.

Without libtpu it falls back to an analytic estimate (parameters + optimizer state + gradients +
activations) and says so. The last line printed is one JSON object (DESIGN.md: ``topology``,
``fits``, ``memory_per_chip_bytes``, ``hbm_per_chip_bytes``, ``flops_per_step``, ``step_time_s``,
``time_to_train_s``, ``energy_kwh``, and more).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import models
from input_pipeline.tokenizers import ByteTokenizer
from models.config import ModelConfig
from train import config_checks, flops
from train import mesh as mesh_lib
from train import state as state_lib
from train import topology as topology_lib
from train.programs import jit_programs


def jit_train_step(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules, model_cfg: ModelConfig
) -> tuple[Any, state_lib.StateSpec, dict[str, Any]]:
  """The trainer's own jitted train step (train/programs.py), its state spec and abstract batch."""
  programs = jit_programs(config, mesh, rules, model_cfg)
  return programs.train_step, programs.spec, programs.abstract_batch


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The model config without building the data pipeline (-1 vocab: the tokenizer's size)."""
  spm = config.data.tokenizer == "sentencepiece"
  vocab = config.data.spm_vocab_size if spm else ByteTokenizer.vocab_size
  return ModelConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=vocab)


# --- the analytic model (used alone without libtpu, and beside the compiler's figures) ---


def _ways(sizes: dict[str, int], rules, logical: str) -> int:
  spec = mesh_lib.logical_to_spec((logical,), rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(sizes[axis] for axis in axes)


def analytic_memory(
  config: ml_collections.ConfigDict, model_cfg: ModelConfig, sizes: dict[str, int], rules
) -> dict[str, int]:
  """Bytes per chip by a rough formula: state and gradients sharded like the parameters,
  activations kept for the backward pass (by remat policy) sharded like the batch.

  Within about a factor of two of the compiler; it ignores padding, fusion and scheduling.
  """
  params = models.param_count(model_cfg)
  param_bytes = jnp.dtype(model_cfg.param_dtype).itemsize
  act_bytes = jnp.dtype(model_cfg.dtype).itemsize
  # Every large weight has an "embed" dimension and one of heads / mlp / vocab.
  state_ways = _ways(sizes, rules, "embed") * max(
    _ways(sizes, rules, "mlp"), _ways(sizes, rules, "heads")
  )
  state = params * param_bytes * 3 // state_ways  # parameters, Adam's mu and nu
  gradients = params * param_bytes // state_ways
  tokens = (
    config.train.batch_size
    * config.data.seq_len
    // (_ways(sizes, rules, "batch") * config.train.microbatches)
  )
  d, mlp, layers = model_cfg.d_model, model_cfg.mlp_dim, model_cfg.num_layers
  kv = 2 * model_cfg.num_kv_heads * model_cfg.head_dim
  heads_ways = _ways(sizes, rules, "heads")
  scores = 2 * 4 * model_cfg.num_heads * config.data.seq_len // heads_ways  # fp32 scores, probs
  # One layer's full working set per token: norms, q/k/v/o, residuals, MLP in and out.
  layer_live = act_bytes * (8 * d + kv + 4 * mlp) + scores
  saved = {
    "full": act_bytes * d,  # the block input only; the rest is recomputed
    "save_dots": act_bytes * (4 * d + kv + 3 * mlp),  # matmul outputs
    "none": layer_live,
  }[model_cfg.remat]
  activations = tokens * (layers * saved + layer_live)
  logits = tokens * model_cfg.vocab_size * 4 * 2 // _ways(sizes, rules, "vocab")  # fp32 + grad
  total = state + gradients + activations + logits
  return {
    "state": state,
    "gradients": gradients,
    "activations": activations,
    "logits": logits,
    "total": total,
  }


# --- ahead-of-time compilation for the slice ---

_SIZE = r"([\d.]+)([KMGT]?)"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _out_of_memory_bytes(message: str) -> int | None:
  """The bytes the compiler wanted, from its "Used 40.1G of 15.7G hbm" out-of-memory error."""
  match = re.search(rf"Used {_SIZE} of {_SIZE} hbm", message)
  if not match:
    return None
  return int(float(match.group(1)) * _UNITS[match.group(2)])


def compile_for(
  config: ml_collections.ConfigDict, model_cfg: ModelConfig, devices: list[jax.Device]
) -> dict[str, Any]:
  """Compiles the train step for ``devices``; per-chip memory and FLOPs from the compiler."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = mesh_lib.logical_rules(config.mesh)
  config_checks.check_config(config, mesh, rules, process_count=1)
  config_checks.check_model_on_mesh(model_cfg, mesh, rules)
  jitted, spec, batch = jit_train_step(config, mesh, rules, model_cfg)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    lowered = jitted.lower(spec.abstract, batch)
    try:
      compiled = lowered.compile()
    except Exception as e:  # XLA reports an HBM overflow as a compile error
      wanted = _out_of_memory_bytes(str(e))
      if "RESOURCE_EXHAUSTED" not in str(e) and wanted is None:
        raise
      return {
        "mesh": mesh_lib.describe(mesh),
        "fits": False,
        "memory_per_chip_bytes": wanted,
        "compile_time_s": time.perf_counter() - start,
        "compile_error": str(e).strip().splitlines()[0][:500],
      }
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  breakdown = {
    "arguments": memory.argument_size_in_bytes,
    "outputs": memory.output_size_in_bytes,
    "aliased": memory.alias_size_in_bytes,  # outputs written over donated arguments
    "temporaries": memory.temp_size_in_bytes,
    "generated_code": memory.generated_code_size_in_bytes,
  }
  total = (
    breakdown["arguments"]
    + breakdown["outputs"]
    - breakdown["aliased"]
    + breakdown["temporaries"]
    + breakdown["generated_code"]
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
    "mesh": mesh_lib.describe(mesh),
    "memory_per_chip_bytes": int(total),
    "memory_breakdown_bytes": breakdown,
    "compile_time_s": seconds,
    # The compiled program is one chip's share of the SPMD step.
    "flops_per_step_compiled": float(cost.get("flops", 0.0)) * len(devices),
  }


def plan(
  config: ml_collections.ConfigDict,
  topology: topology_lib.Topology,
  *,
  tokens: int | None = None,
  mfu: float = 0.4,
  use_compiler: bool = True,
) -> dict[str, Any]:
  """The plan as a dict (the JSON ``train.plan`` prints)."""
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu={mfu} must be in (0, 1]")
  model_cfg = model_config(config)
  chips, chip = topology.chips, topology.chip
  sizes = mesh_lib.mesh_shape(config.mesh, chips)
  rules = mesh_lib.logical_rules(config.mesh)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  flops_per_step = flops.train_flops_per_token(model_cfg, config.data.seq_len) * tokens_per_step
  estimate = analytic_memory(config, model_cfg, sizes, rules)
  result: dict[str, Any] = {
    "topology": topology.name,
    "libtpu_topology": topology.libtpu_name,
    "chips": chips,
    "num_slices": topology.num_slices,
    "device_kind": f"TPU {chip.generation}",
    "mesh": " × ".join(f"{axis}={size}" for axis, size in sizes.items()),
    "params": models.param_count(model_cfg),
    "tokens_per_step": tokens_per_step,
    "hbm_per_chip_bytes": chip.hbm_bytes,
    "analytic_memory_per_chip_bytes": estimate,
  }
  compiled = None
  if use_compiler:
    try:
      devices = topology_lib.devices(topology)
    except RuntimeError as e:
      result["note"] = f"analytic estimate only: {e}"
    else:
      compiled = compile_for(config, model_cfg, devices)
  else:
    result["note"] = "analytic estimate only (--analytic)"
  if compiled is not None:
    result.update(compiled)
    result["method"] = "compiled (libtpu, ahead of time)"
    if result["memory_per_chip_bytes"] is None:  # out of memory without a figure in the message
      result["memory_per_chip_bytes"] = estimate["total"]
  else:
    result.update({"method": "analytic", "memory_per_chip_bytes": estimate["total"]})
  result.setdefault("fits", result["memory_per_chip_bytes"] <= chip.hbm_bytes)
  if "flops_per_step_compiled" in result and model_cfg.scan_layers:
    result["flops_note"] = (
      "XLA's cost analysis counts a scanned layer stack's body once; "
      "flops_per_step_compiled undercounts with model.scan_layers=True"
    )

  tokens = tokens or config.train.steps * tokens_per_step
  steps = math.ceil(tokens / tokens_per_step)
  step_time = flops_per_step / (chips * chip.peak_bf16_flops * mfu)
  seconds = steps * step_time
  pue = config.meter.pue
  result.update(
    {
      "flops_per_step": flops_per_step,  # analytic (train/flops.py): what MFU is quoted against
      "flops_per_step_analytic": flops_per_step,
      "mfu": mfu,
      "peak_flops_per_chip": chip.peak_bf16_flops,
      "power_watts_per_chip": chip.power_watts,
      "pue": pue,
      "tokens": tokens,
      "steps": steps,
      "step_time_s": step_time,
      "tokens_per_second": tokens_per_step / step_time,
      "time_to_train_s": seconds,
      "chip_hours": chips * seconds / 3600,
      "energy_kwh": chips * chip.power_watts * seconds / 3.6e6 * pue,
    }
  )
  return result


def _gib(value: float) -> str:
  return f"{value / 1024**3:,.2f} GiB"


def summary_lines(result: dict[str, Any]) -> list[str]:
  lines = [
    f"{result['topology']} ({result['libtpu_topology']}, {result['chips']} chips), mesh "
    f"{result['mesh']}, {result['params']:,} params; method: {result['method']}",
    f"memory per chip: {_gib(result['memory_per_chip_bytes'])} of "
    f"{_gib(result['hbm_per_chip_bytes'])} HBM: {'fits' if result['fits'] else 'DOES NOT FIT'}"
    f" (analytic estimate {_gib(result['analytic_memory_per_chip_bytes']['total'])})",
    f"FLOPs per step: {result['flops_per_step']:.4g} (analytic)"
    + (
      f", {result['flops_per_step_compiled']:.4g} (compiled)"
      if "flops_per_step_compiled" in result
      else ""
    ),
    f"at MFU {result['mfu']:.0%}: {result['step_time_s']:.3f} s/step, "
    f"{result['tokens_per_second']:,.0f} tokens/s; {result['tokens']:.3g} tokens in "
    f"{result['time_to_train_s'] / 3600:,.1f} h ({result['chip_hours']:,.0f} chip-hours), "
    f"~{result['energy_kwh']:,.0f} kWh (estimated, PUE {result['pue']})",
  ]
  for key in ("note", "flops_note", "compile_error"):
    if key in result:
      lines.append(f"{key.replace('_', ' ')}: {result[key]}")
  return lines


def main(argv: list[str]) -> None:
  from absl import app, flags
  from ml_collections import config_flags

  import configs

  default_config = os.path.join(os.path.dirname(configs.__file__), "default.py")
  config_flag = config_flags.DEFINE_config_file("config", default_config, "Config file.")
  topology_flag = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128, v5e-256.")
  hardware_flag = flags.DEFINE_string("hardware", None, "Alias of --topology.")
  tokens_flag = flags.DEFINE_integer("tokens", 0, "Tokens to train (0 = train.steps × batch).")
  mfu_flag = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the times.")
  slices_flag = flags.DEFINE_integer("num_slices", 1, "Identical slices joined over DCN.")
  analytic_flag = flags.DEFINE_boolean("analytic", False, "Skip compilation; formulas only.")

  def run(args: list[str]) -> None:
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    # Planning compiles for libtpu's compile-only devices; it never needs a local accelerator.
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
    name = topology_flag.value or hardware_flag.value
    try:
      if name is None:
        raise ValueError(
          f"pass --topology (or --hardware), one of: {', '.join(topology_lib.valid_names())}"
        )
      topology = topology_lib.parse(name, slices_flag.value)
      result = plan(
        config_flag.value,
        topology,
        tokens=tokens_flag.value or None,
        mfu=mfu_flag.value,
        use_compiler=not analytic_flag.value,
      )
    except ValueError as e:
      print(f"loom: error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)
    for line in summary_lines(result):
      print(line)
    print(json.dumps(result), flush=True)

  app.run(run, argv)


if __name__ == "__main__":
  main(sys.argv)
