"""Starting a new run from weights: ``checkpoint.init_from = "hf:DIR" | "loom:WORKDIR[@STEP]"``.

The parameters come from a Hugging Face model directory or another Loom run; the optimizer is
fresh and the run starts at step 0 (continued pretraining or fine-tuning on any data source).

``adopt(config)`` runs before validation: the source decides the architecture (every model field
but the numerics, layout and adapters: dtype, param_dtype, scan_layers (a LoRA source's, whose
adapters are merged in its layout, excepted), remat, init_std,
attention, attention_block, lora_*, and an MoE's dispatch and router-loss weights: moe.dispatch,
capacity_factor, balance_loss, router_z_loss, bias_rate), and its tokenizer when the config keeps
the default one. A model field the config sets to something other than the default and other
than the source's value is a conflict, named field by field.
``load_params`` then builds the parameters in the run's shardings.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp

from configs import default
from input_pipeline.host import agreement, storage
from models import lora
from models.config import ModelConfig
from train import config as config_lib
from train import state as state_lib
from train.checkpoint import integrity, manager
from train.config import ConfigError
from train.hf import families
from train.hf.importing import LORA_KEYS, MODEL_KEYS, MOE_RUN_KEYS
from train.hf.importing import load_params as load_hf_params
from train.hf.safetensors_io import HFCheckpoint

log = logging.getLogger("loom")


def _parse(spec: str) -> tuple[str, str, int | None]:
  """("hf" | "loom", path, step or None)."""
  kind, _, rest = spec.partition(":")
  if kind == "hf" and rest:
    return kind, os.path.abspath(os.path.expanduser(rest)), None
  if kind == "loom" and rest:
    path, _, step = rest.partition("@")
    if step and not step.isdigit():
      raise ConfigError(f"checkpoint.init_from={spec!r}: the step after '@' must be a number")
    return kind, os.fspath(storage.absolute(path)), int(step) if step else None
  raise ConfigError(
    f"checkpoint.init_from={spec!r} must be 'hf:<HF model dir>' or 'loom:<work dir>[@step]' "
    "(or '' to start from random weights)"
  )


def _loom_source(path: str, step: int | None) -> tuple[Any, int, dict[str, Any]]:
  """(read-only manager, step, metadata) of another Loom run's checkpoint."""
  try:
    ckpt, steps = manager.open_read_only(path)
  except FileNotFoundError as e:
    raise ConfigError(f"checkpoint.init_from: {e}") from e
  if step is None:  # the processes' oldest latest: a live run may save between two listings
    step = min(int(s) for s in agreement.gather("init-from-latest-step", str(steps[-1])))
  if step not in steps:
    raise ConfigError(f"checkpoint.init_from: {path} has no step {step}; it has {steps}")
  restored = ckpt.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  return ckpt, step, restored["metadata"]


def _source_model(config, kind: str, path: str, step: int | None) -> tuple[dict, dict | None, dict]:
  """The source's model fields (the run's own among them), its tokenizer ({"tokenizer":
  data.tokenizer[, "spm_model": ...]}, or None: no opinion), and a Loom source's model fields as
  it trained ({} for HF)."""
  numerics = {key: config.model[key] for key in MODEL_KEYS + LORA_KEYS}
  if kind == "hf":
    checkpoint = HFCheckpoint(path)
    model = families.model_config_from_hf(checkpoint.config, checkpoint.path, config.model)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer.json"))
    return model.to_dict(), {"tokenizer": f"hf:{path}"} if has_tokenizer else None, {}
  ckpt, step, metadata = _loom_source(path, step)
  ckpt.close()
  data = metadata["config"]["data"]
  tokenizer = {"tokenizer": data["tokenizer"]}
  if data["tokenizer"] == "sentencepiece":
    if not data.get("spm_model"):
      tokenizer = None  # trained on that run's data: the config must bring the same model
    else:  # the model file the weights were trained with
      tokenizer["spm_model"] = data["spm_model"]
  return {**metadata["model_config"], **numerics}, tokenizer, metadata["model_config"]


# The run's own model fields: numerics, layout, adapters, an MoE's dispatch and loss weights.
RUN_KEYS = MODEL_KEYS + LORA_KEYS + tuple(f"moe.{key}" for key in MOE_RUN_KEYS)


def _fields(model: Any) -> dict[str, Any]:
  """Model fields with the ``moe`` group's keys as ``moe.KEY`` (a dense source's: moe.num_experts
  = 0 alone), so that an MoE source and the config are compared, and adopted, key by key."""
  out = {key: value for key, value in dict(model).items() if key != "moe"}
  moe = {"num_experts": 0} if model["moe"] is None else dict(model["moe"])
  out.update({f"moe.{key}": value for key, value in moe.items()})
  return out


def adopt(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the source's architecture and tokenizer (unchanged without init_from)."""
  spec = config.checkpoint.init_from
  if not spec:
    return config
  kind, path, step = _parse(spec)
  source, tokenizer, trained = _source_model(config, kind, path, step)
  if trained.get("lora_rank", 0) > 0 and trained.get("scan_layers") != config.model.scan_layers:
    raise ConfigError(_lora_layout(spec, trained["scan_layers"]))
  defaults = default.get_config()
  fields, default_fields = _fields(config.model), _fields(defaults.model)
  adopted = ml_collections.ConfigDict(config.to_dict())
  conflicts = []
  for key, theirs in _fields(source).items():
    ours = fields[key]
    if key in RUN_KEYS or ours == theirs:
      continue
    if ours != default_fields[key]:
      conflicts.append(f"model.{key}={ours!r} in the config, {theirs!r} in the source")
    group, _, name = key.rpartition(".")
    (adopted.model[group] if group else adopted.model)[name] = theirs
  ours = {"tokenizer": config.data.tokenizer}
  if config.data.tokenizer == "sentencepiece" and config.data.spm_model:
    ours["spm_model"] = config.data.spm_model
  if tokenizer is not None and ours != tokenizer:
    # A tokenizer the config names for good (an HF one, a SentencePiece model file) against the
    # source's is a conflict; the byte default, or SentencePiece to be trained on the run's data
    # (configs/llama_1b.py), give way to the one the weights were trained with.
    named = ours["tokenizer"].startswith("hf:") or "spm_model" in ours
    if named:
      said = lambda t: ", ".join(f"data.{k}={v!r}" for k, v in t.items())  # noqa: E731
      conflicts.append(f"{said(ours)} in the config, {said(tokenizer)} in the source")
    adopted.data.tokenizer = tokenizer["tokenizer"]
    adopted.data.spm_model = tokenizer.get("spm_model", "")
  if conflicts:
    raise ConfigError(
      f"checkpoint.init_from={spec!r} does not match the config: {'; '.join(conflicts)}. "
      "Drop these settings (the source decides the architecture and its tokenizer) or start "
      "from another source"
    )
  return adopted


def load_params(
  config: ml_collections.ConfigDict,
  spec: state_lib.StateSpec,
  model_cfg: ModelConfig,
  mesh: jax.sharding.Mesh,
  rules: Any,
) -> Any:
  """The source's parameters in the shardings of ``spec`` (a fresh run's state spec); the run's
  LoRA adapters come back as None for the caller to initialise. A Loom source trained with LoRA
  is the model it trained: its adapters are merged into their kernels (``models.lora.merge``),
  as its export would be."""
  kind, path, step = _parse(config.checkpoint.init_from)
  if kind == "hf":
    checkpoint = HFCheckpoint(path)
    family = families.family_of(checkpoint.config, checkpoint.path)
    return load_hf_params(checkpoint, family, spec, model_cfg)
  ckpt, step, metadata = _loom_source(path, step)
  problems = integrity.verify(os.path.join(ckpt.directory, str(step)))
  if problems:
    raise ConfigError(f"checkpoint.init_from: {path} step {step} fails its checksums: {problems}")
  base = _without_adapters(spec.abstract["params"])
  loaded = manager.restore_params(ckpt, step, base)
  source_cfg = config_lib.saved_model_config(metadata["model_config"])
  if source_cfg.lora_rank > 0:
    if source_cfg.scan_layers != model_cfg.scan_layers:  # adopt refuses it first
      ckpt.close()
      raise ConfigError(_lora_layout(config.checkpoint.init_from, source_cfg.scan_layers))
    source = state_lib.state_spec(source_cfg, optax.identity(), mesh, rules)
    adapters = manager.restore_params(ckpt, step, _only_adapters(source.abstract["params"]))
    shardings = jax.tree.map(lambda leaf: leaf.sharding, base)
    merge = jax.jit(functools.partial(lora.merge, cfg=source_cfg), out_shardings=shardings)
    loaded = merge(_joined(loaded, adapters))
    log.info(
      "merged %s's LoRA adapters (rank %d, alpha %s) into their kernels",
      path,
      source_cfg.lora_rank,
      source_cfg.lora_alpha,
    )
  ckpt.close()
  return jax.tree_util.tree_map_with_path(
    lambda path, _: _get(loaded, _names(path)), spec.abstract["params"]
  )


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def _without_adapters(tree: Any) -> Any:
  if not isinstance(tree, dict):
    return tree
  return {k: _without_adapters(v) for k, v in tree.items() if not lora.is_adapter([k])}


def _lora_layout(spec: str, scan_layers: bool) -> str:
  return (
    f"checkpoint.init_from={spec!r}: the source's LoRA adapters are merged into its weights in "
    f"its own layer layout (model.scan_layers={scan_layers}); set model.scan_layers={scan_layers}"
  )


def _only_adapters(tree: Any) -> dict:
  """The LoRA adapters of a parameter tree, in its nesting (nothing else)."""
  out = {}
  for key, value in tree.items():
    if lora.is_adapter([key]):
      out[key] = value
    elif isinstance(value, dict) and (inner := _only_adapters(value)):
      out[key] = inner
  return out


def _joined(base: dict, adapters: dict) -> dict:
  """``base`` with ``adapters`` (``_only_adapters``' nesting) put back in."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = _joined(base[key], value) if key in base else value
  return out


def _get(tree: Any, names: list[str]) -> Any:
  """The leaf at ``names``, or None where the tree has none (an adapter)."""
  for name in names:
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree


def with_fresh_adapters(loaded: Any, initial: Any) -> Any:
  """``loaded`` parameters, with ``initial``'s values where ``loaded`` has None (adapters)."""
  return jax.tree.map(lambda init, got: init if got is None else got, initial, loaded,
                      is_leaf=lambda x: x is None)  # fmt: skip
