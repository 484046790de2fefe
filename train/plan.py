"""``python -m train.plan --config configs/X.py --hardware v5p-128|h100:8|h200:8x4 [--tokens N]``.

Plans a run on a TPU slice or on GPU nodes without them (``train/planning.py``): the memory per
chip the compiler needs for the trainer's own train step (ahead of time, on libtpu's or the CUDA
plugin's compile-only devices), whether it fits the chip's HBM, the FLOPs of a step, and at a
stated MFU the step time, the time to train N tokens and the energy; for GPUs also the attention
kernel and the collectives in the compiled program. Without libtpu (the CUDA plugin) it falls
back to an analytic estimate and says so. The last line printed is one JSON object
(``topology``, ``fits``, ``memory_per_chip_bytes``, ``hbm_per_chip_bytes``, ``flops_per_step``,
``step_time_s``, ``time_to_train_s``, ``energy_kwh``, and more).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from absl import flags

import models  # noqa: F401 - first: Flax NNX without IPython where none runs (models/flax_import.py)
from input_pipeline.host import command
from train import planning
from train.meter import hardware


def _gib(value: float) -> str:
  return f"{value / 1024**3:,.2f} GiB"


def summary_lines(result: dict[str, Any]) -> list[str]:
  active = result["params_active"]
  target = result.get("libtpu_topology") or f"CUDA {result['cuda_topology']}"
  lines = [
    f"{result['topology']} ({target}, {result['chips']} × {result['device_kind']}), mesh "
    f"{result['mesh']}"
    + (f" (across nodes: {result['dcn']})" if "dcn" in result else "")
    + f", {result['params']:,} params"
    + (f" ({active:,} active per token)" if active != result["params"] else "")
    + f"; method: {result['method']}",
    f"memory per chip: {_gib(result['memory_per_chip_bytes'])} of "
    f"{_gib(result['hbm_per_chip_bytes'])} HBM: {'fits' if result['fits'] else 'DOES NOT FIT'}"
    f" (analytic estimate {_gib(result['analytic_memory_per_chip_bytes']['total'])})",
    f"attention: {result['attention']} (keeps ~"
    f"{_gib(result['analytic_memory_per_chip_bytes']['saved_by_attention_kernel'])} of scores "
    f"out of memory); loss in chunks of {result['loss_chunk'] or 'all'} positions (keeps ~"
    f"{_gib(result['analytic_memory_per_chip_bytes']['saved_by_loss_chunks'])} of logits out)",
    f"FLOPs per step: {result['flops_per_step']:.4g} (analytic)"
    + (
      f", {result['flops_per_step_compiled']:.4g} (compiled)"
      if "flops_per_step_compiled" in result
      else ""
    ),
    f"at MFU {result['mfu']:.0%} of the datasheet dense peak "
    f"({result['peak_flops_per_chip'] / 1e12:,.0f} TFLOP/s per chip): "
    f"{result.get('pipeline', {}).get('step_time_with_bubble_s', result['step_time_s']):.3f} "
    f"s/step{' with the bubble' if 'pipeline' in result else ''}, "
    f"{result['tokens_per_second']:,.0f} tokens/s; {result['tokens']:.3g} tokens in "
    f"{result['time_to_train_s'] / 3600:,.1f} h ({result['chip_hours']:,.0f} chip-hours), "
    f"~{result['energy_kwh']:,.0f} kWh (estimated, PUE {result['pue']})",
  ]
  if "attention_in_program" in result:
    calls = result.get("attention_calls") or []
    packed = sorted({c["ragged_offsets"] for c in calls if c["ragged_offsets"]})
    lines.append(
      f"attention in the compiled program: {', '.join(result['attention_in_program'])}"
      + (f" (packed rows, ragged offsets {', '.join(packed)} per GPU)" if packed else "")
    )
  if "low_precision_in_program" in result:
    lines.append(low_precision_line(result))
  if result.get("collectives"):
    lines.append(
      "collectives in the program (a loop body once): "
      + ", ".join(
        f"{kind} ×{c['count']} ({_gib(c['bytes'])})" for kind, c in result["collectives"].items()
      )
    )
  if "moe" in result:
    lines.append(moe_line(result))
  if "pipeline" in result:
    lines.append(
      "pipeline: {stages} stages, {microbatches} microbatches, {repeats} repeats: bubble "
      "{bubble:.1%} of the ticks, {step_time_with_bubble_s:.3f} s/step with it".format(
        **result["pipeline"]
      )
    )
  lines.append(checkpoint_line(result["checkpoints"]))
  for key in ("note", "mesh_note", "memory_note", "flops_note", "compile_error"):
    if key in result:
      lines.append(f"{key.replace('_', ' ')}: {result[key]}")
  return lines


def checkpoint_line(checkpoints: dict[str, Any]) -> str:
  parts = []
  for tier in ("local", "persistent"):
    if tier not in checkpoints:
      continue
    c = checkpoints[tier]
    if c["interval_s"] is None:
      parts.append(f"{tier}: only at the end (a failure loses the run so far)")
      continue
    parts.append(
      f"{tier} every {c['every_steps']} steps ({c['interval_s'] / 60:,.1f} min): save "
      f"{c['save_s']:,.1f} s, ~{c['expected_loss_per_failure_s'] / 60:,.1f} min lost per failure"
    )
  return (
    f"checkpoints ({_gib(checkpoints['state_bytes_per_host'])} of state per host): "
    + "; ".join(parts)
    + ("" if "local" in checkpoints else " (checkpoint.local_dir adds a local tier)")
  )


def low_precision_line(result: dict[str, Any]) -> str:
  """The fp8 and int8 GEMMs the compiled program holds (``train/meter/gemms.py``)."""
  found = []
  for fmt, count in result["low_precision_in_program"].items():
    gemms = [g for g in result["low_precision_gemms"] if g["format"] == fmt]
    if count:
      forward = sum(g["count"] for g in gemms if g["pass"] == "forward")
      kernels = ", ".join(sorted({g["kernel"] for g in gemms}))
      found.append(f"{fmt} ×{count} (forward {forward}, backward {count - forward}; {kernels})")
  return "low-precision GEMMs in the compiled program (a loop body once): " + (
    "; ".join(found) or "none"
  )


def moe_line(result: dict[str, Any]) -> str:
  """The MoE dispatch a plan is for: the experts, how tokens reach them, what the buffers hold."""
  moe = result["moe"]
  line = (
    f"MoE: {moe['num_experts']} experts (top-{moe['experts_per_token']}, width "
    f"{moe['expert_dim']:,}), {moe['dispatch']} dispatch"
  )
  if moe["setting"] != moe["dispatch"]:
    where = {"tpu": "TPUs", "gpu": "GPUs"}.get(moe.get("platform", "tpu"), moe.get("platform"))
    line += f" (model.moe.dispatch={moe['setting']}, as on {where})"
  if moe["dispatch"] == "capacity":
    line += f" (capacity_factor {moe['capacity_factor']})"
  if moe["expert_ways"] > 1:
    line += f"; experts split {moe['expert_ways']} ways, tokens exchanged by all-to-all"
    if "expert_all_to_all_in_program" in result:
      found = result["expert_all_to_all_in_program"]
      line += " (in the compiled program)" if found else " (NOT in the compiled program)"
  else:
    line += "; experts not split (no expert axis): the compiler partitions the dispatch"
  return line + f"; buffers {moe['buffer_rows_per_token']:g} rows per token"


_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "TPU slice (v5p-128, v5e-256) or GPUs per node x nodes (h100:8, h200:8x4)."
)
_HARDWARE = flags.DEFINE_string("hardware", None, "Alias of --topology.")
_TOKENS = flags.DEFINE_integer("tokens", 0, "Tokens to train (0 = train.steps × batch).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the times.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Identical slices (GPU nodes) joined over DCN.")
_ANALYTIC = flags.DEFINE_boolean("analytic", False, "Skip compilation; formulas only.")
_QUICK = flags.DEFINE_boolean(
  "quick",
  False,
  "Compile with XLA's least optimization effort: a large TPU program in about half the time "
  "(the CUDA compiler's time hardly changes), its memory figure within ~10%. For checking many "
  "configs; the final figure is a full compile's.",
)
_LOCAL_GBPS = flags.DEFINE_float(
  "local_save_gbps",
  planning.DEFAULT_SAVE_RATES["local"] / 1e9,
  "GB/s per host of a local-tier save (checkpoint.local_dir), for the lost time per failure.",
)
_PERSISTENT_GBPS = flags.DEFINE_float(
  "persistent_save_gbps",
  planning.DEFAULT_SAVE_RATES["persistent"] / 1e9,
  "GB/s per host of a persistent save (the work directory), for the lost time per failure.",
)

USAGE = (
  "usage: python -m train.plan [--config FILE] --hardware v5p-128|h100:8|h100:8x4 [--tokens N] "
  "[--mfu 0.4] [--quick | --analytic]"
)


def main(argv: list[str]) -> int:
  # Planning compiles for compile-only devices; it never needs a local accelerator.
  jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
  name = _TOPOLOGY.value or _HARDWARE.value
  if name is None:
    raise ValueError(
      f"pass --topology (or --hardware), one of: {', '.join(hardware.valid_names())}; or GPUs "
      f"as {hardware.GPU_NAME_FORM}"
    )
  if _TOKENS.value < 0:
    raise ValueError(f"--tokens={_TOKENS.value} must be >= 0 (0 = train.steps × the batch)")
  topology = hardware.parse(name, _SLICES.value)
  result = planning.plan(
    command.config(),
    topology,
    tokens=_TOKENS.value or None,
    mfu=_MFU.value,
    use_compiler=not _ANALYTIC.value,
    quick=_QUICK.value,
    save_rates={"local": _LOCAL_GBPS.value * 1e9, "persistent": _PERSISTENT_GBPS.value * 1e9},
  )
  for line in summary_lines(result):
    print(line)
  print(json.dumps(result), flush=True)
  return command.EXIT_OK


if __name__ == "__main__":
  command.run(
    main, usage=USAGE, config_default="default.py", multi_process=False, bad_input=(ValueError,)
  )
