"""``ConfigError`` and the one validation of a whole run config, before any work.

``validate(config, workdir=...)`` runs right after ``jax.distributed`` has started and before any
data is prepared or anything compiled: the train, optimizer, data, model, mesh, meter and work
directory settings, the model against its tokenizer's vocabulary (known from the config alone) and
against the mesh, and the mesh against the device and process counts. Every message names the
key, its value and what would be valid. It writes nothing: a refused run leaves no trace.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from configs import default
from input_pipeline import device, mixture_spec, tokenizers
from input_pipeline.host import storage
from input_pipeline.host.command import LoomError
from models import pipeline
from models.attention import context_kernel
from models.config import ModelConfig
from train import dpo, health, optimizer
from train import state as state_lib
from train.cluster import mesh as mesh_lib
from train.inference import tasks as task_index
from train.meter import hardware
from train.rl import rewards

SOURCE_PREFIXES = ("stdlib", "files:", "tfds:", "chat:", "prefs:")


class ConfigError(LoomError, ValueError):
  """A config value, flag or path a user gave is not valid; the message says what would be."""


@dataclasses.dataclass(frozen=True)
class Resolved:
  """What validation resolved on the way: the model config, the mesh and its rule table."""

  model_cfg: ModelConfig
  mesh: Mesh
  rules: mesh_lib.Rules


def validate(
  config: ml_collections.ConfigDict,
  *,
  workdir: str | None = None,
  devices: list[jax.Device] | None = None,
  process_count: int | None = None,
  with_tokenizer: bool = True,
) -> Resolved:
  """Checks the whole config for ``devices`` (default: all) and ``process_count`` processes.

  ``with_tokenizer=False`` (train.plan, which feeds no data) leaves the model's vocabulary
  unchecked against the tokenizer's. Raises ConfigError (or input_pipeline's DataError for a
  tokenizer file) naming what to change.
  """
  _check_finite(config.to_dict())
  _check_known_keys(config.to_dict(), default.get_config().to_dict())
  _check_train(config)
  _check_objective(config)
  _check_optim(config.optim)
  _check_data(config.data)
  _check_meter(config.meter)
  _check_harness(config.harness)
  model_cfg = model_config(config, with_tokenizer=with_tokenizer)
  try:
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    rules = mesh_lib.logical_rules(config.mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  process_count = jax.process_count() if process_count is None else process_count
  _check_batch(config, mesh, rules, process_count)
  _check_context(config, mesh, rules, mesh.devices.flat[0].platform)
  _check_pipeline(config, model_cfg, mesh, rules)
  _check_tensor_within_hosts(mesh.devices, mesh.axis_names)
  _check_model_on_mesh(model_cfg, mesh, rules)
  try:
    hardware.check_quant(model_cfg.quant, model_cfg.quant_emulation, mesh.devices.flat[0])
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if workdir is not None:  # a run that trains (an import, a plan or a bench does not)
    check_trainable(model_cfg)
    check_workdir(workdir)
  return Resolved(model_cfg, mesh, rules)


def check_trainable(cfg: ModelConfig) -> None:
  """What a model may hold and be loaded with, but not be trained with: a saved LoRA run's
  targets or an import's float16 weights stay loadable for inference."""
  if cfg.lora_rank and cfg.mlp != "swiglu" and "gate" in cfg.lora_targets:
    raise ConfigError(
      f"model.lora_targets={cfg.lora_targets}: 'gate' is a kernel of the swiglu MLP, and "
      f"model.mlp={cfg.mlp!r} has none (its kernels: up, down); no adapter would be trained there"
    )
  if cfg.lora_rank and not cfg.lora_alpha > 0:
    raise ConfigError(
      f"model.lora_alpha={cfg.lora_alpha!r} must be > 0: the adapters' output is scaled by "
      "alpha / rank, and 0 leaves them without a gradient"
    )
  if cfg.param_dtype == "float16":
    raise ConfigError(
      "model.param_dtype='float16' keeps the parameters and Adam's moments in float16, "
      "without loss scaling: eps and small second moments round to 0 and the first update is "
      "inf; train with 'float32' (model.dtype='float16' or 'bfloat16' computes) or 'bfloat16'"
    )


def model_config(config: ml_collections.ConfigDict, *, with_tokenizer: bool = True) -> ModelConfig:
  """The model config with its -1 defaults resolved from the data config (no data prepared)."""
  _check_dense_has_no_moe_settings(config.model)
  vocab = tokenizers.vocab_size_from_config(config.data)
  try:
    model_cfg = ModelConfig.from_config(
      config.model,
      seq_len=config.data.seq_len,
      vocab_size=vocab,
      pipeline=config.get("pipeline"),
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if with_tokenizer and model_cfg.vocab_size < vocab:
    raise ConfigError(
      f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
      f"({vocab}); use -1 or at least {vocab}"
    )
  if model_cfg.max_seq_len < config.data.seq_len:
    raise ConfigError(
      f"model.max_seq_len={model_cfg.max_seq_len} is shorter than data.seq_len="
      f"{config.data.seq_len}; use -1 or at least {config.data.seq_len}"
    )
  return model_cfg


def _check_dense_has_no_moe_settings(model) -> None:
  """MoE settings on a dense model (model.moe.num_experts = 0) would be silently ignored."""
  if model.get("moe") is None or model.moe.num_experts:
    return  # an MoE model, or a dense one whose config came from a ModelConfig (moe None)
  defaults = default.get_config().model.moe
  changed = [key for key in defaults if key != "num_experts" and model.moe[key] != defaults[key]]
  if changed:
    settings = ", ".join(f"model.moe.{key}={model.moe[key]!r}" for key in changed)
    raise ConfigError(
      f"{settings} set on a dense model (model.moe.num_experts=0): set model.moe.num_experts "
      f"to make the MLPs mixtures of experts, or leave these at their defaults"
    )


def saved_model_config(saved: dict[str, Any]) -> ModelConfig:
  """The ModelConfig a run saved (checkpoint metadata); a field Loom gained since then takes the
  default config's value."""
  return ModelConfig(**{**default.get_config().model.to_dict(), **saved})


def check_layout(
  config: ml_collections.ConfigDict, model_cfg: ModelConfig, sizes: dict, platform: str
) -> None:
  """``validate``'s checks of the batch, context, stages, heads, experts and parameter shapes
  against mesh axis ``sizes`` alone, on an abstract mesh of ``platform``'s chips ("tpu", "gpu"):
  ``train.plan --analytic`` (or without libtpu or the CUDA plugin) has no devices to build a mesh
  of, and must refuse what a run would refuse."""
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
  rules = mesh_lib.logical_rules(config.mesh)
  _check_batch(config, mesh, rules, 1)
  _check_context(config, mesh, rules, platform)
  _check_pipeline(config, model_cfg, mesh, rules)
  _check_model_on_mesh(model_cfg, mesh, rules)


def _check_known_keys(values: dict[str, Any], known: dict[str, Any], prefix: str = "") -> None:
  """Every key is one of configs/default.py's: a config file that sets ``c.optim.lr`` (adding a
  key ml_collections allows) would train with the default learning rate. The model group is
  ModelConfig's to check (models/config.py), an MoE's included."""
  for name, value in values.items():
    key = f"{prefix}{name}"
    if key == "model":
      continue
    if name not in known:
      close = difflib.get_close_matches(name, list(known), n=1)
      hint = f"did you mean {prefix}{close[0]}? " if close else ""
      raise ConfigError(
        f"{key} is not a config key ({hint}the keys of {prefix.rstrip('.') or 'the config'}: "
        f"{', '.join(sorted(known))}); every key is declared in configs/default.py"
      )
    if isinstance(value, dict) and isinstance(known[name], dict) and known[name]:
      _check_known_keys(value, known[name], f"{key}.")


def _check_finite(values: dict[str, Any], prefix: str = "") -> None:
  """No key of the config holds NaN or an infinity: a comparison such as ``value < 0`` lets NaN
  through, and a run trained on one skips every step or compiles nothing useful."""
  for name, value in values.items():
    key = f"{prefix}{name}"
    if isinstance(value, dict):
      _check_finite(value, f"{key}.")
    items = value if isinstance(value, list | tuple) else [value]
    for item in items:
      if isinstance(item, float) and not math.isfinite(item):
        raise ConfigError(f"{key}={value!r}: must be a finite number")


def _integers(config, keys: list[str], minimum: int, what: str) -> None:
  for key in keys:
    group, name = key.split(".")
    value = config[group][name]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise ConfigError(f"{key}={value!r} must be {what}")


def _check_local_tier(checkpoint) -> None:
  if not isinstance(checkpoint.local_dir, str):
    raise ConfigError(f"checkpoint.local_dir={checkpoint.local_dir!r} must be a path (or '': off)")
  if storage.is_remote(checkpoint.local_dir):
    raise ConfigError(
      f"checkpoint.local_dir={checkpoint.local_dir!r} must be a path on each host's own disk "
      "(a RAM disk such as /dev/shm/loom, or a local SSD): the object store is the persistent "
      "tier (--workdir)"
    )
  if checkpoint.local_replicas not in (0, 1) or isinstance(checkpoint.local_replicas, bool):
    raise ConfigError(
      f"checkpoint.local_replicas={checkpoint.local_replicas!r} must be 0 (no replica) or 1 "
      "(a copy of each process's shards on the next process)"
    )


def _check_train(config) -> None:
  positive = ["train.steps", "train.batch_size", "train.microbatches", "train.eval_batches"]
  positive += ["log.every", "checkpoint.max_to_keep", "data.seq_len", "train.max_consecutive_skips"]
  positive += ["checkpoint.save_timeout_s", "checkpoint.local_every", "checkpoint.local_keep"]
  _integers(config, positive, 1, "a positive integer")
  non_negative = [
    "train.eval_every",
    "checkpoint.every",
    "train.max_rollbacks",
    "log.sample_tokens",
    "train.loss_chunk",
    "checkpoint.save_retries",
  ]
  _integers(config, non_negative, 0, "a non-negative integer (0 = off)")
  _check_local_tier(config.checkpoint)
  chunk, seq_len = config.train.loss_chunk, config.data.seq_len
  if chunk > 0 and seq_len % chunk:
    raise ConfigError(
      f"train.loss_chunk={chunk} does not divide data.seq_len={seq_len}; use a divisor of it "
      "(or 0: the whole sequence at once)"
    )
  train = config.train
  if train.spike_policy not in health.SPIKE_POLICIES:
    raise ConfigError(
      f"train.spike_policy={train.spike_policy!r} is not one of {health.SPIKE_POLICIES}"
    )
  if train.spike_policy == "rollback" and config.checkpoint.every == 0:
    raise ConfigError(
      "train.spike_policy='rollback' returns to the last checkpoint, but checkpoint.every=0 "
      "saves none before the end (every spike would only be skipped): give checkpoint.every > 0 "
      "or train.spike_policy='skip'"
    )
  if train.spike_policy != "off" and not train.spike_factor > 1:
    raise ConfigError(
      f"train.spike_factor={train.spike_factor!r} must be > 1 (a loss that many times "
      f"the running mean is a spike), or set train.spike_policy='off'"
    )
  log = config.log
  if log.sample_tokens > 0 and not (isinstance(log.sample_prompt, str) and log.sample_prompt):
    raise ConfigError(
      f"log.sample_prompt={log.sample_prompt!r} must be a non-empty text to continue at each "
      "eval, or set log.sample_tokens=0 (no sample)"
    )
  window = tuple(config.log.profile_steps)
  if window and (
    len(window) != 2
    or not all(isinstance(s, int) for s in window)
    or not 1 <= window[0] <= window[1]
  ):
    raise ConfigError(
      f"log.profile_steps={window} must be () or (start, stop) with 1 <= start <= stop"
    )
  for key in ("nan_steps", "spike_steps"):
    steps = tuple(config.debug[key])
    if any(not isinstance(s, int) or s < 1 for s in steps):
      raise ConfigError(f"debug.{key}={steps} must hold step numbers >= 1")


def _check_objective(config) -> None:
  """train.objective against the data and the dpo group: preference pairs and DPO go together."""
  objective, source = config.train.objective, config.data.source
  if objective not in dpo.OBJECTIVES:
    raise ConfigError(f"train.objective={objective!r} is not one of {dpo.OBJECTIVES}")
  prefs = isinstance(source, str) and source.startswith("prefs:") and not tuple(config.data.mixture)
  if objective == "grpo":
    _check_rl(config)
    return
  if objective == "lm":
    if prefs:
      raise ConfigError(
        f"data.source={source!r} holds preference pairs, which train.objective='lm' would "
        "train on both completions of; set train.objective='dpo'"
      )
    return
  if not prefs:
    given = (
      f"data.mixture={tuple(config.data.mixture)}"
      if tuple(config.data.mixture)
      else (f"data.source={source!r}")
    )
    raise ConfigError(
      f"train.objective='dpo' needs preference data, not {given}; use "
      "data.source='prefs:<pairs.jsonl>' (one source)"
    )
  d = config.dpo
  if d.loss not in dpo.LOSSES:
    raise ConfigError(f"dpo.loss={d.loss!r} is not one of {dpo.LOSSES}")
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if not number(d.beta) or not d.beta > 0:
    raise ConfigError(f"dpo.beta={d.beta!r} must be > 0")
  if not number(d.label_smoothing) or not 0 <= d.label_smoothing < 0.5:
    raise ConfigError(f"dpo.label_smoothing={d.label_smoothing!r} must be in [0, 0.5)")
  if d.loss == "ipo" and d.label_smoothing:
    raise ConfigError(
      f"dpo.label_smoothing={d.label_smoothing!r} has no meaning for dpo.loss='ipo'; set it to "
      "0, or use dpo.loss 'sigmoid' or 'simpo'"
    )
  if not number(d.simpo_gamma) or d.simpo_gamma < 0:
    raise ConfigError(f"dpo.simpo_gamma={d.simpo_gamma!r} must be >= 0")
  for key in ("train.loss_chunk", "optim.z_loss"):
    group, name = key.split(".")
    if value := config[group][name]:
      raise ConfigError(
        f"{key}={value!r} is not supported with train.objective='dpo' (its log-probs use the "
        "whole logits); set it to 0"
      )


def _check_rl(config) -> None:
  """The rl group of a GRPO run (python -m train.rl): files, reward functions, sizes, ranges."""
  r, train = config.rl, config.train
  for key in ("prompts", "eval_prompts"):
    path = r[key]
    if (path or key == "prompts") and not (path and storage.absolute(path).is_file()):
      raise ConfigError(f"rl.{key}={path!r}: no such file; give a JSON-lines file of prompts")
  rewards.load(r.rewards, r.reward_weights)  # an import that fails is a RewardError here
  _integers(config, ["rl.group_size"], 2, "an integer >= 2 (advantages compare within a group)")
  _integers(config, ["rl.max_new_tokens", "rl.inner_steps"], 1, "a positive integer")
  _integers(config, ["rl.eval_limit"], 0, "a non-negative integer (0 = all)")
  if train.batch_size % r.group_size:
    raise ConfigError(
      f"rl.group_size={r.group_size} does not divide train.batch_size={train.batch_size} "
      f"(completions per rollout); use a batch of a multiple of {r.group_size}"
    )
  if r.max_new_tokens >= config.data.seq_len:
    raise ConfigError(
      f"rl.max_new_tokens={r.max_new_tokens} leaves no room for a prompt in data.seq_len="
      f"{config.data.seq_len}; use fewer new tokens or a longer data.seq_len"
    )
  mu = r.inner_steps
  for key in ("train.steps", "checkpoint.every", "train.eval_every"):
    group, name = key.split(".")
    if config[group][name] % mu:
      raise ConfigError(
        f"{key}={config[group][name]} is not a multiple of rl.inner_steps={mu} (each rollout "
        "batch takes that many optimizer steps); use a multiple of it"
      )
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  ranges = {
    "temperature": ("> 0 (GRPO's log-probs divide by it)", lambda v: v > 0),
    "top_p": ("in (0, 1]", lambda v: 0 < v <= 1),
    "epsilon": ("in (0, 1)", lambda v: 0 < v < 1),
    "kl_coef": (">= 0 (0 = no reference model)", lambda v: v >= 0),
  }
  for name, (valid, ok) in ranges.items():
    if not number(r[name]) or not ok(r[name]):
      raise ConfigError(f"rl.{name}={r[name]!r} must be {valid}")
  for key in ("train.loss_chunk", "optim.z_loss"):
    group, name = key.split(".")
    if value := config[group][name]:
      raise ConfigError(
        f"{key}={value!r} is not supported with train.objective='grpo' (its log-probs use the "
        "whole logits); set it to 0"
      )
  if config.train.spike_policy == "rollback":
    raise ConfigError(
      "train.spike_policy='rollback' is not supported with train.objective='grpo': its loss "
      "measures no progress from step to step, so no loss spike is detected; non-finite steps "
      "are skipped up to train.max_consecutive_skips (train.spike_policy='skip' or 'off')"
    )


# optim keys: (what a valid value is, the test of it).
_OPTIM_RANGES = {
  "learning_rate": ("> 0", lambda v: v > 0),
  "min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
  "b1": ("in [0, 1)", lambda v: 0 <= v < 1),
  "b2": ("in [0, 1)", lambda v: 0 <= v < 1),
  "eps": ("> 0", lambda v: v > 0),
  "weight_decay": (">= 0", lambda v: v >= 0),
  "grad_clip_norm": (">= 0 (0 = off)", lambda v: v >= 0),
  "z_loss": (">= 0 (0 = off)", lambda v: v >= 0),
}


def _check_optim(optim) -> None:
  if optim.schedule not in optimizer.SCHEDULES:
    raise ConfigError(f"optim.schedule={optim.schedule!r} is not one of {optimizer.SCHEDULES}")
  for key, (valid, test) in _OPTIM_RANGES.items():
    value = optim[key]
    if not isinstance(value, (int, float)) or not test(value):
      raise ConfigError(f"optim.{key}={value!r} must be {valid}")
  _integers({"optim": optim}, ["optim.warmup_steps"], 0, "a non-negative integer")


def _check_data(data) -> None:
  if tuple(data.mixture):
    mixture_spec.parse(tuple(data.mixture), tuple(data.mixture_stages))  # DataError names the key
    for spec, _ in data.mixture:
      _check_source(spec, "data.mixture source")
  else:
    if tuple(data.mixture_stages):
      raise ConfigError(
        f"data.mixture_stages={tuple(data.mixture_stages)} changes a mixture's weights, but "
        "data.mixture is () (one data.source): set data.mixture, or mixture_stages=()"
      )
    _check_source(data.source, "data.source")
  _check_store_keys(data)


def _check_source(spec, key: str) -> None:
  if not isinstance(spec, str) or not any(spec == p or spec.startswith(p) for p in SOURCE_PREFIXES):
    raise ConfigError(
      f"{key}={spec!r} is not one of the forms stdlib, files:<dir or glob>, "
      f"tfds:<name>[:<version>], chat:<conversations.jsonl>, prefs:<pairs.jsonl>"
    )


def _check_store_keys(data) -> None:
  if not isinstance(data.store_shard_mb, int | float) or not data.store_shard_mb > 0:
    raise ConfigError(f"data.store_shard_mb={data.store_shard_mb!r} must be > 0 (MB per shard)")
  percent = data.validation_percent
  if not isinstance(percent, (int, float)) or not 0 <= percent < 100:
    raise ConfigError(f"data.validation_percent={percent!r} must be in [0, 100)")


def _check_harness(harness) -> None:
  """In-training lm-eval tasks: well-formed, the harness installed, every task known."""
  tasks = harness.tasks
  if isinstance(tasks, str) or not all(isinstance(t, str) and t for t in tasks):
    raise ConfigError(f"harness.tasks={tasks!r} must be a tuple of lm-eval task names")
  for key in ("limit", "batch_size"):
    value = harness[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < (key == "batch_size"):
      raise ConfigError(f"harness.{key}={value!r} must be an integer >= {int(key == 'batch_size')}")
  if not tasks:
    return
  if harness.include_path and not os.path.isdir(harness.include_path):
    raise ConfigError(f"harness.include_path={harness.include_path!r} is not a directory")
  try:
    unknown = task_index.unknown(tuple(tasks), harness.include_path or None)
  except task_index.HarnessMissingError as e:
    raise ConfigError(
      f"harness.tasks={tuple(tasks)} needs EleutherAI's lm-eval: pip install -e '.[eval]'"
    ) from e
  if unknown:
    raise ConfigError(
      f"harness.tasks: unknown task(s) {unknown}; offline, define them by YAML files with local "
      f"data in a folder and set harness.include_path to it"
    )


def _check_meter(meter) -> None:
  if not meter.pue >= 1:
    raise ConfigError(f"meter.pue={meter.pue!r} must be >= 1 (1.0 = count the devices only)")
  if not meter.power_watts >= 0 or not meter.grid_kg_per_kwh >= 0:
    raise ConfigError(
      f"meter.power_watts={meter.power_watts!r} and meter.grid_kg_per_kwh="
      f"{meter.grid_kg_per_kwh!r} must be >= 0"
    )


def _check_batch(config, mesh: Mesh, rules, process_count: int) -> None:
  batch, micro = config.train.batch_size, config.train.microbatches
  dp = mesh_lib.data_parallel_size(mesh, rules)
  if batch % (dp * micro):
    raise ConfigError(
      f"train.batch_size={batch} is not divisible by the data-parallel size {dp} "
      f"({mesh_lib.describe(mesh)}) × train.microbatches={micro} = {dp * micro}; use a "
      f"multiple of {dp * micro}"
    )
  if process_count > 1:  # a run; train.plan (one process, no data) compiles any mesh
    # Each process reads its block of every batch's rows (processes along an axis that splits no
    # rows, such as stages across slices, read the same block): blocks that divide the
    # data-parallel shards, so the size check above covers them.
    try:
      device.row_blocks(mesh_lib.batch_sharding(mesh, rules))
    except ValueError as e:
      raise ConfigError(f"mesh: {e}") from e


def _check_context(config, mesh: Mesh, rules, platform: str) -> None:
  """A context axis splits each row's length, in the striped layout (models/context_parallel.py):
  the row length must be a multiple of its size, and the rules must give it to a batch's
  "length" (not to its "batch", whose rule would take it first)."""
  batch_entry, length_entry = mesh_lib.partition_spec(("batch", "length"), rules)
  batch_axes, axes = (
    () if e is None else (e,) if isinstance(e, str) else tuple(e)
    for e in (batch_entry, length_entry)
  )
  size = mesh.shape[mesh_lib.CONTEXT]
  if size > 1 and mesh_lib.CONTEXT not in axes:
    raise ConfigError(
      f"mesh.context={size} but mesh.rules splits a batch's 'length' over {axes} (and its "
      f"'batch' over {batch_axes}): map ('length', 'context') and keep 'context' out of the "
      f"batch rule"
    )
  split = math.prod(mesh.shape[axis] for axis in axes)
  seq_len = config.data.seq_len
  if seq_len % split:
    raise ConfigError(
      f"data.seq_len={seq_len} is not divisible by {split}, the size of mesh axes {axes} that "
      f"split each row ({mesh_lib.describe(mesh)}); use a multiple of {split}"
    )
  if split == 1:
    return
  model = config.model
  try:
    kernel = context_kernel(
      model.attention, model.dtype, seq_len, split, model.attention_context, platform
    )
  except ValueError as e:
    raise ConfigError(str(e)) from e
  local, block = seq_len // split, model.attention_block
  # The XLA all-gather form goes by blocks of each shard's queries; splash has its own.
  gathered = kernel == "xla" and model.attention_context == "all_gather"
  if gathered and 0 < block < local and local % block:
    raise ConfigError(
      f"model.attention_block={block} does not divide the {local} positions of each row's "
      f"context shard (data.seq_len={seq_len} / {split}): the all-gather attention goes by "
      f"whole blocks of them; use a divisor of {local}, or 0 (whole shards)"
    )


def _check_pipeline(config, model_cfg: ModelConfig, mesh: Mesh, rules) -> None:
  """Pipeline stages (models/pipeline.py) split the scanned layers of a dense model: the layers
  must divide into stages × repeats, each forward pass's rows into microbatches (at least one per
  stage when the schedule is circular)."""
  size = mesh.shape[mesh_lib.STAGE]
  stages, axes = mesh_lib.ways(mesh, rules, "layers")
  if (size > 1 and axes != (mesh_lib.STAGE,)) or (stages > 1 and mesh_lib.STAGE not in axes):
    raise ConfigError(
      f"mesh.stage={size} but mesh.rules splits the stacked 'layers' over {axes}: map "
      f"('layers', 'stage'), the only axis that splits layers into pipeline stages"
    )
  if stages == 1:
    return
  described = f"{stages} pipeline stages ({mesh_lib.describe(mesh)})"
  if not model_cfg.scan_layers:
    raise ConfigError(f"{described} split the scanned layers: set model.scan_layers=True")
  if model_cfg.moe is not None:
    raise ConfigError(
      f"{described} run dense models only for now: model.moe.num_experts="
      f"{model_cfg.moe.num_experts}; use mesh.stage=1 (experts split over mesh.expert)"
    )
  micro, repeats = model_cfg.pipeline_microbatches, model_cfg.pipeline_repeats
  try:
    pipeline.check(model_cfg.num_layers, stages, micro, repeats)
  except ValueError as e:
    raise ConfigError(f"{e} ({described})") from e
  m = pipeline.resolve_microbatches(micro, stages)
  rows = config.train.batch_size // config.train.microbatches
  dp = mesh_lib.data_parallel_size(mesh, rules)
  if rows % (m * dp):
    raise ConfigError(
      f"pipeline.microbatches={m} does not cut the {rows} rows of each forward pass "
      f"(train.batch_size={config.train.batch_size} / train.microbatches="
      f"{config.train.microbatches}) into microbatches that the {dp} data-parallel shards "
      f"split evenly; use microbatches × {dp} dividing {rows}"
    )


def _within_hosts(
  devices: np.ndarray, axis_names: tuple[str, ...], axis: str, setting, why
) -> None:
  """Refuses a mesh whose ``axis`` groups span processes: the error names ``setting(size)``,
  the processes and devices of the first such group, then ``why``."""
  if axis not in axis_names:
    return
  groups = np.moveaxis(devices, axis_names.index(axis), -1)
  groups = groups.reshape(-1, groups.shape[-1])
  for group in groups:
    owners = sorted({device.process_index for device in group})
    if len(owners) > 1:
      raise ConfigError(
        f"{setting(groups.shape[-1])} would span processes {owners} "
        f"(devices {[d.id for d in group]}): {why}"
      )


def _check_tensor_within_hosts(devices: np.ndarray, axis_names: tuple[str, ...]) -> None:
  """Tensor parallelism exchanges activations at every layer: its axis must stay on one host's
  fast links, never cross the data-centre network between processes."""
  _within_hosts(
    devices,
    axis_names,
    mesh_lib.TENSOR,
    lambda size: f"mesh.tensor={size}",
    "tensor parallelism must stay within one host; use mesh.tensor <= the devices per process "
    "and put the other devices on data or fsdp",
  )


def _check_model_on_mesh(model_cfg: ModelConfig, mesh: Mesh, rules) -> None:
  """Head counts against the mesh axes that split heads, then every parameter's shape."""
  for name, logical in (("num_heads", "heads"), ("num_kv_heads", "kv_heads")):
    value = getattr(model_cfg, name)
    split, axes = mesh_lib.ways(mesh, rules, logical)
    if value % split:
      raise ConfigError(
        f"model.{name}={value} is not divisible by {split}, the size of mesh axes {axes} that "
        f"split {logical!r} ({mesh_lib.describe(mesh)}); use mesh sizes whose product divides "
        f"{value}"
      )
  _check_experts_on_mesh(model_cfg, mesh, rules)
  # Shapes only (jax.eval_shape): no parameter is allocated.
  params = state_lib.state_spec(model_cfg, optax.identity(), mesh, rules).abstract["params"]
  jax.tree_util.tree_map_with_path(lambda path, leaf: _check_divisible(path, leaf, mesh), params)


def _check_experts_on_mesh(model_cfg: ModelConfig, mesh: Mesh, rules) -> None:
  """The mesh axes that split the experts: none for a dense model; for an MoE model they must
  divide the expert count and also split the batch (each expert shard its own tokens)."""
  split, axes = mesh_lib.ways(mesh, rules, "expert")
  if split == 1:
    return
  if model_cfg.moe is None:
    raise ConfigError(
      f"mesh axes {axes} of size {split} split experts ({mesh_lib.describe(mesh)}) but the "
      f"model is dense (model.moe.num_experts=0); set mesh.expert=1 and put the devices on "
      f"data or fsdp, or make the model a mixture of experts"
    )
  if model_cfg.moe.num_experts % split:
    raise ConfigError(
      f"model.moe.num_experts={model_cfg.moe.num_experts} is not divisible by {split}, the "
      f"size of mesh axes {axes} that split the experts ({mesh_lib.describe(mesh)}); use an "
      f"expert count that {split} divides or a smaller mesh.expert"
    )
  _, batch_axes = mesh_lib.ways(mesh, rules, "batch")
  missing = [axis for axis in axes if axis not in batch_axes]
  if missing:
    raise ConfigError(
      f"mesh.rules splits the experts over {axes} but the batch only over {batch_axes}: add "
      f"{missing} to the batch rule, so that each expert shard holds its own tokens"
    )


def _check_divisible(path, leaf, mesh: Mesh) -> None:
  spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
  for dim, (size, axes) in enumerate(zip(leaf.shape, spec, strict=True)):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    if mesh_lib.CONTEXT in names and mesh.shape[mesh_lib.CONTEXT] > 1:
      raise ConfigError(
        f"parameter {jax.tree_util.keystr(path)} would be split over the context axis "
        f"(mesh axes {names} on dimension {dim}; {mesh_lib.describe(mesh)}): the context axis "
        f"splits activations' length only; map no parameter axis to 'context' in mesh.rules"
      )
    ways = math.prod(mesh.shape[name] for name in names)
    if size % ways:
      raise ConfigError(
        f"parameter {jax.tree_util.keystr(path)} has shape {leaf.shape}: dimension {dim} (size "
        f"{size}) cannot be split {ways} ways over mesh axes {names} "
        f"({mesh_lib.describe(mesh)}); change the model size or the mesh so that {ways} "
        f"divides {size}"
      )


def check_workdir(workdir: str) -> str:
  """The absolute work directory (an object-store URI stays as given); refuses files and
  unwritable local places. Creates nothing."""
  if storage.is_remote(workdir):
    path = storage.absolute(workdir)
    try:
      is_file = path.is_file()
    except Exception as e:  # noqa: BLE001 - every store library raises its own kinds
      raise ConfigError(
        f"--workdir {workdir} cannot be reached: {type(e).__name__}: {str(e)[:300]} (for an "
        f"emulator or another GCS-compatible endpoint set {storage.EMULATOR_VARIABLE})"
      ) from e
    if is_file:
      raise ConfigError(f"--workdir {workdir} is an object, not a directory; pass a prefix")
    return os.fspath(path)
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir {path} is a file, not a directory; pass a directory path")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"--workdir {path} cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {path} is not writable by this user; choose another directory")
  return path


def create_workdir(workdir: str) -> str:
  """Creates the (validated) work directory; returns its absolute path or URI."""
  path = check_workdir(workdir)
  try:
    storage.absolute(path).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir {path} cannot be created: {e.strerror or e}") from e
  return path
