"""Planning a run on a TPU slice or GPU nodes without them (the library behind ``train.plan``).

``plan(config, hardware.parse("v5p-128"))`` compiles the trainer's own train step ahead of time
for the slice's devices (libtpu's compile-only topology descriptions, on this CPU machine) and
reports what the compiler says it needs per chip, whether that fits the chip's HBM, the FLOPs of
one step, and — at a stated MFU, from the chip's datasheet bf16 peak and power in the hardware
table (``train/meter/hardware.py``) — the step time, the time to train N tokens and the energy.
``hardware.parse("h100:8x4")`` does the same for NVIDIA GPUs through the CUDA plugin's
compile-only devices (``train/cluster/gpu_nodes.py``), and reports the attention kernel and the
collectives found in the compiled program. Without libtpu (or the CUDA plugin) it falls back to
an analytic estimate (parameters + optimizer state + gradients + activations) and says so.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import models
from models import moe as moe_lib
from models import pipeline
from models.attention import context_kernel, cudnn_checks_for, implementation
from models.config import ModelConfig
from train import config as config_lib
from train.cluster import gpu_nodes, tpu_slice
from train.cluster import mesh as mesh_lib
from train.meter import flops, hardware, hlo_text
from train.meter.gemms import low_precision_counts, low_precision_gemms
from train.programs import jit_programs, uses_reference

# --- the analytic model (used alone without libtpu, and beside the compiler's figures) ---


def _ways(sizes: dict[str, int], rules, logical: str) -> int:
  spec = mesh_lib.partition_spec((logical,), rules)[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(sizes[axis] for axis in axes)


def parameter_bytes_per_chip(model_cfg: ModelConfig, sizes: dict[str, int], rules) -> int:
  """One chip's share of the parameters: each parameter's shape (``nnx.eval_shape``: nothing is
  allocated) split over the mesh axes its logical names map to (an MoE model's experts over
  expert × fsdp, its attention over fsdp alone), rounded up per dimension."""

  def init():
    return nnx.split(models.Transformer(model_cfg, rngs=nnx.Rngs(params=0)), nnx.Param)[1]

  total = 0
  variables = jax.tree.leaves(nnx.eval_shape(init), is_leaf=lambda x: isinstance(x, nnx.Variable))
  for variable in variables:
    names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
    shard = [
      -(-size // (_ways(sizes, rules, name) if name else 1))
      for size, name in zip(variable.shape, names, strict=True)
    ]
    total += math.prod(shard) * jnp.dtype(variable.dtype).itemsize
  return total


def moe_dispatch(model_cfg: ModelConfig, sizes: dict[str, int], rules) -> dict[str, Any] | None:
  """How an MoE model's tokens reach their experts on this mesh (models/moe.py), or None for a
  dense model: the dispatch, the ways the experts are split and the rows of [*, D] and [*, F]
  buffers each local token fills (dropless across ``e`` expert shards: room for every local
  assignment per peer, K·e rows; capacity: capacity_factor·K rows)."""
  moe = model_cfg.moe
  if moe is None:
    return None
  expert_ways = _ways(sizes, rules, "expert")
  k = moe.experts_per_token
  rows = k * moe.capacity_factor if moe.dispatch == "capacity" else k * expert_ways
  out = {
    "num_experts": moe.num_experts,
    "experts_per_token": k,
    "expert_dim": moe.expert_dim,
    "dispatch": moe.dispatch,
    "expert_ways": expert_ways,
    "exchange": "all_to_all in shard_map" if expert_ways > 1 else "compiler-partitioned",
    "buffer_rows_per_token": rows,
  }
  if moe.dispatch == "capacity":
    out["capacity_factor"] = moe.capacity_factor
  return out


def analytic_memory(
  config: ml_collections.ConfigDict,
  model_cfg: ModelConfig,
  sizes: dict[str, int],
  rules,
  platform: str = "tpu",
  capability: float | None = None,
) -> dict[str, int]:
  """Bytes per chip by a rough formula: state and gradients sharded like the parameters (leaf by
  leaf), activations kept for the backward pass (by remat policy) sharded like the batch, and an
  MoE layer's dispatch buffers (``moe_dispatch``).

  It read 1.4x the compiler's figure for llama_1b on v5p-128 (the one pod config compiled both
  ways); it ignores padding, fusion and scheduling.
  """
  act_bytes = jnp.dtype(model_cfg.dtype).itemsize
  param_bytes = parameter_bytes_per_chip(model_cfg, sizes, rules)
  state = param_bytes * 3  # parameters, Adam's mu and nu (in the parameters' dtype)
  # One micro-batch's gradients, and with several the running sum they are added to.
  gradients = param_bytes * (2 if config.train.microbatches > 1 else 1)
  tokens = (
    config.train.batch_size
    * config.data.seq_len
    // (_ways(sizes, rules, "batch") * config.train.microbatches)
  )
  d, mlp, layers = model_cfg.d_model, model_cfg.mlp_dim, model_cfg.num_layers
  kv = 2 * model_cfg.num_kv_heads * model_cfg.head_dim
  heads_ways = _ways(sizes, rules, "heads")
  # fp32 scores and probabilities of one layer, unless a kernel streams them (kept: O(L) stats)
  scores_full = 2 * 4 * model_cfg.num_heads * config.data.seq_len // heads_ways
  context = _ways(sizes, rules, "length")
  tokens //= context  # a device's share of each row under context parallelism
  kernel = attention_kernel(model_cfg, config.data.seq_len, platform, context, capability)
  scores = 0 if kernel in ("cudnn", "splash") or kernel.endswith("+splash") else scores_full
  block, local = model_cfg.attention_block, config.data.seq_len // context
  if kernel == "context:all_gather" and block and local > block and local % block == 0:
    scores = scores_full * block // local  # one block of local queries' scores at a time

  def per_layer(mlp: int, experts: int = 0, experts_saved: int = 0) -> tuple[int, int]:
    """(one layer's full working set per token: norms, q/k/v/o, residuals, MLP in and out, an
    MoE's dispatch buffers; what the remat policy keeps of it for the backward pass)."""
    live = act_bytes * (8 * d + kv + 4 * mlp) + scores + experts
    saved = {
      "full": act_bytes * d,  # the block input only; the rest is recomputed
      # matmul outputs (no batch dimension: an MoE's grouped matmuls are not among them)
      "save_dots": act_bytes * (4 * d + kv + 3 * (mlp - experts_saved)),
      "save_attention": act_bytes * 2 * d,  # block input and attention output
      "save_mlp": act_bytes * (d + 2 * mlp),  # block input and the MLP's input projections
      "save_attention_mlp": act_bytes * (2 * d + 2 * mlp),
      "none": live,
    }[model_cfg.remat]
    return live, saved

  layer_live, saved = per_layer(mlp)
  saved_all = layers * saved
  dispatch = moe_dispatch(model_cfg, sizes, rules)
  if dispatch:
    f = model_cfg.moe.expert_dim
    # Per buffer row ~4 [D] rows (sent, received, sorted, sent back) and ~6 [F] ones (gate, up,
    # their product; float32 matmul outputs; the backward's): fitted to the compiled figures of
    # mixtral_8x7b and qwen3_30b_a3b on v5p (docs/moe.md). Plus float32 router logits and probs.
    rows = dispatch["buffer_rows_per_token"]
    experts = int(act_bytes * rows * (4 * d + 6 * f)) + 2 * 4 * model_cfg.moe.num_experts
    # The shared experts' MLP, and the routed experts' hidden rows ("mlp", as the dense MLP's).
    moe_live, moe_saved = per_layer(
      model_cfg.moe.shared_experts * f + int(rows * f), experts, int(rows * f)
    )
    dense = model_cfg.moe.first_dense  # the first layers' MLPs are model.mlp_dim wide
    layer_live = max(moe_live, layer_live) if dense else moe_live
    saved_all = dense * saved + (layers - dense) * moe_saved
  # Pipeline stages: a device keeps its stage's layers' saved inputs, for all of its rows, and
  # the microbatch buffer (its rows' hidden states) beside them.
  stages = _ways(sizes, rules, "layers")
  activations = tokens * (saved_all // stages + layer_live)
  if stages > 1:
    activations += tokens * act_bytes * d * 2
  logits_full = tokens * model_cfg.vocab_size * 4 * 2 // _ways(sizes, rules, "vocab")  # + grad
  chunk = config.train.loss_chunk
  logits = logits_full * chunk // config.data.seq_len if chunk else logits_full
  total = state + gradients + activations + logits
  return {
    "state": state,
    "gradients": gradients,
    "activations": activations,
    "logits": logits,
    "total": total,
    # What the attention kernel and the chunked loss keep out of memory (by this formula).
    "saved_by_attention_kernel": tokens * (scores_full - scores),
    "saved_by_loss_chunks": logits_full - logits,
  }


def attention_kernel(
  model_cfg: ModelConfig,
  seq_len: int,
  platform: str = "tpu",
  context: int = 1,
  capability: float | None = None,
) -> str:
  """The attention kernel the train step asks for on ``platform`` ("tpu" or "gpu"):
  ``model.attention`` resolved; under a split context, "context:" and the form, with "+splash"
  where the splash kernel runs per shard (models/attention.py ``context_kernel``; the XLA math
  inside shard_map otherwise, models/context_parallel.py). On GPUs the plan also reports what
  the compiled program holds (``attention_in_program``)."""
  if context > 1:
    form = model_cfg.attention_context
    fused = context_kernel(model_cfg.attention, model_cfg.dtype, seq_len, context, form, platform)
    return f"context:{form}" + ("+splash" if fused == "splash" else "")
  return implementation(
    model_cfg.attention, model_cfg.dtype, seq_len, platform, model_cfg.head_dim, capability
  )


def platform_of(topology) -> str:
  """ "gpu" for GPU nodes, "tpu" for a TPU slice."""
  return "gpu" if isinstance(topology, hardware.GpuNodes) else "tpu"


# --- ahead-of-time compilation for the slice ---

_SIZE = r"([\d.]+)([KMGT]?)"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _out_of_memory_bytes(message: str, arguments: int = 0) -> int | None:
  """The bytes the compiler wanted, from its out-of-memory error: "Used 40.1G of 15.7G hbm" (the
  total), or "the total memory required for HLO temporaries (125.01G) exceeds available HBM"
  (temporaries alone: ``arguments``, the program's inputs, are added)."""
  match = re.search(rf"Used {_SIZE} of {_SIZE} hbm", message)
  if match:
    return int(float(match.group(1)) * _UNITS[match.group(2)])
  match = re.search(rf"memory required for HLO temporaries \({_SIZE}\) exceeds", message)
  if match:
    return int(float(match.group(1)) * _UNITS[match.group(2)]) + arguments
  return None


def _shard_bytes(tree) -> int:
  """One device's bytes of a pytree of sharded ShapeDtypeStructs."""
  return sum(
    math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    for leaf in jax.tree.leaves(tree)
  )


# ``quick``: XLA's least effort at making the program fast (ExecutableBuildOptions'
# exec_time_optimization_effort): the same program, scheduled with less search. What it saves and
# how far its memory figure moves: docs/pods.md.
QUICK_COMPILE = {"exec_time_optimization_effort": -1.0}


def compile_for(
  config: ml_collections.ConfigDict,
  model_cfg: ModelConfig,
  devices: list[jax.Device],
  quick: bool = False,
) -> dict[str, Any]:
  """Compiles the train step for ``devices``; per-chip memory and FLOPs from the compiler
  (``quick``: with ``QUICK_COMPILE``'s options)."""
  resolved = config_lib.validate(config, devices=devices, process_count=1, with_tokenizer=False)
  mesh, rules = resolved.mesh, resolved.rules
  programs = jit_programs(config, mesh, rules, model_cfg)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), cudnn_checks_for(devices[0]):
    lowered = programs.train_step.lower(programs.spec.abstract, programs.abstract_batch)
    try:
      compiled = lowered.compile(QUICK_COMPILE if quick else None)
    except Exception as e:  # XLA reports an HBM overflow as a compile error
      arguments = _shard_bytes([programs.spec.abstract, programs.abstract_batch])
      wanted = _out_of_memory_bytes(str(e), arguments)
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
  cost = compiled.cost_analysis()  # None on the CUDA plugin's compile-only devices
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  out = {
    "mesh": mesh_lib.describe(mesh),
    "memory_per_chip_bytes": int(total),
    "memory_breakdown_bytes": breakdown,
    "compile_time_s": seconds,
    "collectives": hlo_text.collectives(hlo),
  }
  if cost:  # the compiled program is one chip's share of the SPMD step
    out["flops_per_step_compiled"] = float(cost.get("flops", 0.0)) * len(devices)
  if devices[0].platform == "gpu":
    calls = hlo_text.cudnn_attention_calls(hlo)
    out["attention_in_program"] = sorted({call["target"] for call in calls}) or ["XLA"]
    out["attention_calls"] = calls
  else:
    out["attention_in_program"] = hlo_text.splash_kernels(hlo) or ["XLA"]
  # The low-precision matmuls as compiled (model.quant asks; the compiler may not oblige).
  out["low_precision_gemms"] = gemms = low_precision_gemms(hlo)
  out["low_precision_in_program"] = low_precision_counts(gemms)
  if model_cfg.moe is not None:  # the experts' exchange, as compiled (models/moe.py)
    out["expert_all_to_all_in_program"] = hlo_text.has_expert_exchange(hlo)
  return out


def dispatch_for_tpu(
  config: ml_collections.ConfigDict, platform: str = "tpu"
) -> ml_collections.ConfigDict:
  """``config`` with ``model.moe.dispatch=auto`` resolved as on the TPU slice (dropless), or on
  ``platform``.

  ``auto`` picks by the backend that traces the step (``models.moe.resolve_dispatch``), and a
  plan traces on this CPU host: unresolved, it would compile the CPU's capacity dispatch."""
  if not config.model.moe.num_experts or config.model.moe.dispatch != "auto":
    return config
  config = config.copy_and_resolve_references()
  config.model.moe.dispatch = moe_lib.resolve_dispatch("auto", platform)
  return config


DCN_AXES = ("dcn_stage", "dcn_data", "dcn_fsdp", "dcn_context", "dcn_expert", "dcn_tensor")


def nodes_over_dcn(config: ml_collections.ConfigDict, topology) -> ml_collections.ConfigDict:
  """``config`` with its slices (TPU slices, GPU nodes) on ``mesh.dcn_data`` where the config
  sets no ``mesh.dcn_*`` size: data-parallel replicas across nodes, the mesh.* axes within one
  (the hybrid layout, as a multi-node run would declare it)."""
  if topology.num_slices == 1 or math.prod(config.mesh.get(a, 1) for a in DCN_AXES) != 1:
    return config
  config = config.copy_and_resolve_references()
  config.mesh.dcn_data = topology.num_slices
  return config


def plan(
  config: ml_collections.ConfigDict,
  topology: hardware.Topology,
  *,
  tokens: int | None = None,
  mfu: float = 0.4,
  use_compiler: bool = True,
  quick: bool = False,
  save_rates: dict[str, float] | None = None,
) -> dict[str, Any]:
  """The plan as a dict (the JSON ``train.plan`` prints). ``quick``: compile with XLA's least
  optimization effort (``QUICK_COMPILE``). ``save_rates``: bytes/s per host of a save to each
  checkpoint tier (``checkpoint_losses``)."""
  save_rates = save_rates or DEFAULT_SAVE_RATES
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu={mfu} must be in (0, 1]")
  if quick and not use_compiler:
    raise ValueError("--quick compiles with less effort, --analytic does not compile: pass one")
  setting, given = config.model.moe.dispatch, config
  platform = platform_of(topology)
  config = nodes_over_dcn(dispatch_for_tpu(config, platform), topology)
  model_cfg = config_lib.model_config(config, with_tokenizer=False)
  chip = topology.chip
  # Before any compile, and for --analytic too: a format the chips lack is refused, not planned.
  hardware.check_quant_on(model_cfg.quant, model_cfg.quant_emulation, chip)
  sizes = mesh_lib.mesh_shape(config.mesh, topology.chips)
  config_lib.check_layout(config, model_cfg, sizes, platform)  # what a run refuses, --analytic too
  rules = mesh_lib.logical_rules(config.mesh)
  capability = chip.compute_capability if platform == "gpu" else None
  estimate = analytic_memory(config, model_cfg, sizes, rules, platform, capability)
  result: dict[str, Any] = {
    "topology": topology.name,
    # The compile-only devices' name for it: libtpu's ("v5p:4x4x4") or the CUDA plugin's
    # (nodes x 1 x GPUs per node).
    **(
      {"cuda_topology": topology.cuda_topology}
      if platform == "gpu"
      else {"libtpu_topology": topology.libtpu_name}
    ),
    "chips": topology.chips,
    "num_slices": topology.num_slices,
    "device_kind": chip.name,
    "mesh": " × ".join(f"{axis}={size}" for axis, size in sizes.items()),
    "params": models.param_count(model_cfg),
    # What one token uses (an MoE model's router and K experts): the FLOPs below count these.
    "params_active": models.param_count(model_cfg, active=True),
    "tokens_per_step": config.train.batch_size * config.data.seq_len,
    "hbm_per_chip_bytes": chip.hbm_bytes,
    "analytic_memory_per_chip_bytes": estimate,
    "attention": attention_kernel(
      model_cfg, config.data.seq_len, platform, _ways(sizes, rules, "length"), capability
    ),
    "loss_chunk": config.train.loss_chunk,
  }
  if topology.num_slices > 1:
    result["dcn"] = " × ".join(f"{a}={config.mesh.get(a, 1)}" for a in DCN_AXES)
    if math.prod(given.mesh.get(a, 1) for a in DCN_AXES) == 1:  # nodes_over_dcn chose it
      n = topology.num_slices
      result["mesh_note"] = (
        f"planned with mesh.dcn_data={n} (the config sets no mesh.dcn_* size): run it with "
        f"--config.mesh.dcn_data={n}; without it the run's mesh is flat over all "
        f"{topology.chips} chips, which this plan does not describe"
      )
  dispatch = moe_dispatch(model_cfg, sizes, rules)
  if dispatch:
    # setting: model.moe.dispatch as given; platform: whose choice "auto" took
    result["moe"] = dict(dispatch, setting=setting, platform=platform)
  result.update(_memory(config, model_cfg, topology, estimate, use_compiler, quick))
  # XLA's GPU compiler does not refuse a program larger than the memory: the plan compares.
  result.setdefault("fits", result["memory_per_chip_bytes"] <= chip.hbm_bytes)
  note = preallocation_note(result["memory_per_chip_bytes"], chip.hbm_bytes)
  if platform == "gpu" and note:
    result.setdefault("memory_note", note)
  if "flops_per_step_compiled" in result:
    undercounts = []
    if model_cfg.scan_layers:
      undercounts.append("counts a scanned layer stack's body once (model.scan_layers=True)")
    if result["attention"] in ("cudnn", "splash"):
      undercounts.append(f"cannot see inside the {result['attention']} attention kernel")
    if undercounts:
      result["flops_note"] = (
        f"XLA's cost analysis {' and '.join(undercounts)}: flops_per_step_compiled undercounts"
      )
  result.update(_time_and_energy(config, model_cfg, topology, tokens, mfu))
  stages = _ways(sizes, rules, "layers")
  step_time = result["step_time_s"]
  if stages > 1:  # the idle ticks of the schedule lengthen each step (models/pipeline.py)
    schedule = pipeline.schedule(
      stages, model_cfg.pipeline_microbatches, model_cfg.pipeline_repeats
    )
    # step_time_s is the stages' compute at the assumed MFU; the run's time, chip-hours,
    # energy and rate include the bubble (its MFU is mfu × (1 - bubble)).
    step_time = step_time / (1 - schedule["bubble"])
    schedule["step_time_with_bubble_s"] = step_time
    schedule["mfu_with_bubble"] = mfu * (1 - schedule["bubble"])
    result["pipeline"] = schedule
    longer = step_time / result["step_time_s"]
    for key in ("time_to_train_s", "chip_hours", "energy_kwh"):
      result[key] *= longer
    result["tokens_per_second"] /= longer
  result["checkpoints"] = checkpoint_losses(
    config, estimate["state"] * chips_per_host(topology), step_time, save_rates
  )
  return result


# Bytes/s per host of a save, measured on a 2-core dev machine (docs/reliability.md): the local
# tier to a RAM disk, the persistent tier (Orbax, sealed) to a local disk. An object store's rate
# is the user's to give (--persistent_save_gbps), from a run's report.json.
DEFAULT_SAVE_RATES = {"local": 1.0e9, "persistent": 0.7e9}


def chips_per_host(topology) -> int:
  return getattr(topology, "gpus_per_node", None) or math.prod(topology.chips_per_host_bounds)


def checkpoint_losses(
  config: ml_collections.ConfigDict, state_bytes_per_host: int, step_time_s: float, rates
) -> dict[str, Any]:
  """What a failure costs with each checkpoint tier: half a save interval of steps redone on
  average, plus the restore (read at the save's rate); and a save's time per host.

  ``rates`` are bytes/s per host for the "local" and "persistent" tiers (the plan's flags;
  measured ones from a run's report.json: ``local_tier``'s bytes over its write seconds)."""
  tiers = {"persistent": config.checkpoint.every}
  if config.checkpoint.local_dir:
    tiers["local"] = config.checkpoint.local_every
  out: dict[str, Any] = {"state_bytes_per_host": state_bytes_per_host}
  for tier, every in tiers.items():
    save_s = state_bytes_per_host / rates[tier]
    interval_s = every * step_time_s if every else None
    out[tier] = {
      "every_steps": every,
      "save_s": save_s,
      "interval_s": interval_s,
      # A failure lands anywhere in the interval: half of it redone, plus the restore.
      "expected_loss_per_failure_s": (interval_s / 2 + save_s) if interval_s else None,
    }
  return out


def preallocation_note(memory: int, hbm: int) -> str | None:
  """What a GPU run needs when a plan fits its memory but not the 75% of it JAX preallocates."""
  if 0.75 * hbm < memory <= hbm:
    needed = math.ceil(memory / hbm * 100) / 100  # the fraction the program needs, rounded up
    fraction = max(needed + 0.02, 0.9)  # and some for the CUDA context, cuDNN's, NCCL's buffers
    advice = f"run with XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.2f}"
    if fraction > 0.99:
      advice = "little is left for the CUDA context and the libraries' buffers: use more GPUs"
    return f"{memory / hbm:.0%} of the GPU's memory, over the 75% that JAX preallocates: {advice}"
  return None


def _memory(
  config, model_cfg, topology, estimate, use_compiler: bool, quick: bool
) -> dict[str, Any]:
  """Memory per chip from the compiler where libtpu (or the CUDA plugin) is here, else from the
  analytic estimate."""
  gpu = platform_of(topology) == "gpu"
  if not use_compiler:
    note = "analytic estimate only (--analytic)"
  else:
    try:
      source = gpu_nodes if gpu else tpu_slice
      devices = source.compile_only_devices(topology)
    except RuntimeError as e:
      note = f"analytic estimate only: {e}"
    else:
      compiled = compile_for(config, model_cfg, devices, quick)
      compiled["method"] = (
        "compiled (CUDA plugin, ahead of time, no GPU" if gpu else "compiled (libtpu, ahead of time"
      ) + (", quick: least optimization effort)" if quick else ")")
      compiled["compile_effort"] = "quick" if quick else "full"
      if compiled["memory_per_chip_bytes"] is None:  # out of memory, no figure in the message
        compiled["memory_per_chip_bytes"] = estimate["total"]
        compiled["memory_note"] = "the compiler's error gave no figure: the analytic estimate"
      return compiled
  return {"note": note, "method": "analytic", "memory_per_chip_bytes": estimate["total"]}


def _time_and_energy(config, model_cfg, topology, tokens: int | None, mfu: float) -> dict:
  """Step time, time to train and energy at ``mfu`` of the chips' datasheet peak."""
  chips, chip = topology.chips, topology.chip
  tokens_per_step = config.train.batch_size * config.data.seq_len
  # Analytic FLOPs (train/meter/flops.py) over the datasheet peak of the compute dtype: the
  # same quantity the trainer's MFU divides by.
  per_token = flops.train_flops_per_token(model_cfg, config.data.seq_len)
  if uses_reference(config):  # DPO's or GRPO's reference model, a forward pass a step
    per_token += flops.forward_flops_per_token(model_cfg, config.data.seq_len)
  flops_per_step = per_token * tokens_per_step
  peak = chip.peak_flops[model_cfg.dtype if model_cfg.dtype in chip.peak_flops else "bfloat16"]
  tokens = tokens or config.train.steps * tokens_per_step
  steps = math.ceil(tokens / tokens_per_step)
  step_time = flops_per_step / (chips * peak * mfu)
  seconds = steps * step_time
  pue = config.meter.pue
  return {
    "flops_per_step": flops_per_step,
    "flops_per_step_analytic": flops_per_step,
    "mfu": mfu,
    "peak_flops_per_chip": peak,
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
