"""Hugging Face weights into Loom: parameters streamed tensor by tensor into their shardings.

``load_params(checkpoint, family, spec)`` builds every parameter of ``spec`` (a born-sharded
state spec) on this host's devices: for each parameter it reads the HF tensors it comes from one
layer at a time, transforms them (``train/hf/families.py``) and copies into each local device's
shard only that device's slice. A host holds at most one layer's HF tensors of one parameter
(one tensor; the E experts' tensors of an MoE projection) plus its own shards of the parameter
being built, never the whole model. ``import_checkpoint`` writes the result as a Loom
checkpoint (parameters, the model config derived from HF's config.json, the tokenizer).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from tokenizers import Tokenizer

from input_pipeline.host import agreement, storage
from models import lora
from models.config import ModelConfig
from train import config as config_lib
from train import state as state_lib
from train.checkpoint.manager import Checkpointer
from train.hf import families
from train.hf.families import ConversionError, Family
from train.hf.safetensors_io import HFCheckpoint

log = logging.getLogger("loom")

# Files of an HF tokenizer that travel with the weights (the ones present are copied).
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.json",
  "merges.txt",
  "tokenizer.model",
  "chat_template.jinja",
)
# From the run config: numerics and layout, not the architecture.
MODEL_KEYS = (
  "dtype",
  "param_dtype",
  "scan_layers",
  "remat",
  "init_std",
  "attention",
  "attention_block",
  "quant",  # the projections' matmul precision: the parameters are the same (docs/gpus.md)
  "quant_emulation",
)
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_targets")  # a run's, never a checkpoint's
# From the run config's model.moe: how the experts are dispatched and the router losses' weights
# (training choices; an HF config holds none of them in Loom's form, see train/hf/families.py).
MOE_RUN_KEYS = ("dispatch", "capacity_factor", "balance_loss", "router_z_loss", "bias_rate")


def check_partial(partial: str) -> None:
  """Process 0's verdict on ``partial`` (storage.check_partial), on every process: the others
  must not look while process 0 may already be replacing an unfinished attempt's."""
  problem = None
  if jax.process_index() == 0:
    try:
      storage.check_partial(partial)
    except FileExistsError as e:
      problem = str(e)
    problem = problem or ""
  problem = agreement.from_main("hf-partial", problem)
  if problem:
    raise ConversionError(problem)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def load_params(checkpoint: HFCheckpoint, family: Family, spec: state_lib.StateSpec, cfg) -> Any:
  """The Loom parameters of ``spec`` built from ``checkpoint``'s tensors, sharded like ``spec``.

  LoRA adapters (none in an HF checkpoint) come back as None, to be initialised by the caller.
  """
  block_rules, top_rules = family.block_rules(cfg), family.top_rules(cfg)

  def build(path, abstract):
    names = _path_names(path)
    if lora.is_adapter(names):
      return None
    if names[0] != "blocks":
      leaf = ".".join(names)
      return _leaf(abstract, lambda _: _value(checkpoint, "", top_rules, leaf, abstract), None)
    if cfg.scan_layers:
      leaf = ".".join(names[1:])
      prefix = family.block_prefix
      return _leaf(
        abstract,
        lambda i: _value(checkpoint, prefix.format(i=i), block_rules, leaf, abstract, layer=True),
        cfg.num_layers,
      )
    layer, leaf = int(names[1]), ".".join(names[2:])
    prefix = family.block_prefix.format(i=layer)
    return _leaf(abstract, lambda _: _value(checkpoint, prefix, block_rules, leaf, abstract), None)

  return jax.tree_util.tree_map_with_path(build, spec.abstract["params"])


def _value(checkpoint, prefix, rules, leaf, abstract, *, layer: bool = False) -> np.ndarray:
  """One Loom parameter (one layer's slice of it when ``layer``) from its HF tensors."""
  if leaf not in rules:
    raise ConversionError(f"no HF tensor maps to Loom parameter {leaf!r} ({checkpoint.path})")
  forms = rules[leaf] if isinstance(rules[leaf], list) else [rules[leaf]]
  held = [form for form in forms if all(checkpoint.has(prefix + name) for name in form[0])]
  names, transform = (held or forms)[0]  # none held: the first form names the missing tensor
  tensors = [checkpoint.tensor(prefix + name) for name in names]
  expected = abstract.shape[1:] if layer else abstract.shape
  try:
    value = transform(*tensors)
  except ValueError as e:  # a reshape that does not fit
    value = None
    problem = str(e)
  if value is None or value.shape != expected:
    shapes = ", ".join(f"{prefix}{n} {tuple(t.shape)}" for n, t in zip(names, tensors, strict=True))
    raise ConversionError(
      f"{checkpoint.path}: tensor {shapes} does not fit Loom parameter {leaf!r} of shape "
      f"{tuple(expected)}" + (f" ({problem})" if value is None else "")
    )
  return value.astype(abstract.dtype)


def _leaf(abstract, value: Callable[[int], np.ndarray], layers: int | None) -> jax.Array:
  """A global array with ``abstract``'s sharding, each local shard filled from host values.

  ``layers`` set: the array is [layers, ...] and ``value(i)`` gives layer i, read once for all
  local devices; otherwise ``value(0)`` gives the whole array.
  """
  sharding = abstract.sharding
  indices = sharding.addressable_devices_indices_map(abstract.shape)
  buffers = {
    device: np.empty(sharding.shard_shape(abstract.shape), abstract.dtype) for device in indices
  }
  if layers is None:
    whole = value(0)
    for device, index in indices.items():
      buffers[device][...] = whole[index]
  else:
    for i in range(layers):
      layer = value(i)
      for device, index in indices.items():
        rows = range(*index[0].indices(layers))
        if i in rows:
          buffers[device][rows.index(i)] = layer[index[1:]]
  arrays = [jax.device_put(buffers[device], device) for device in indices]
  return jax.make_array_from_single_device_arrays(abstract.shape, sharding, arrays)


def run_config(
  base: ml_collections.ConfigDict, model_cfg: ModelConfig, tokenizer_dir: str | None
) -> ml_collections.ConfigDict:
  """The run config of an imported model: ``base`` with the model fields (and tokenizer) set."""
  config = ml_collections.ConfigDict(base.to_dict())
  for key, value in model_cfg.to_dict().items():
    config.model[key] = value
  if tokenizer_dir is not None:
    config.data.tokenizer = f"hf:{tokenizer_dir}"
  # Training rows no longer than the model's context (GPT-2: 1024 positions).
  config.data.seq_len = min(config.data.seq_len, model_cfg.max_seq_len)
  return config


def model_config(checkpoint: HFCheckpoint, base: ml_collections.ConfigDict) -> ModelConfig:
  """The HF model's config with the run config's numerics and layout (dtype, scan, remat)."""
  # An import holds the checkpoint's weights alone: adapters belong to the run that trains them.
  run_model = {**base.model.to_dict(), "lora_rank": 0}
  return families.model_config_from_hf(checkpoint.config, checkpoint.path, run_model)


def check_tokenizer(checkpoint: HFCheckpoint, model_cfg: ModelConfig) -> str | None:
  """The checkpoint's tokenizer.json path (None without one), checked against the vocabulary."""
  path = os.path.join(checkpoint.path, "tokenizer.json")
  if not os.path.isfile(path):
    return None
  size = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
  if size > model_cfg.vocab_size:
    raise ConversionError(
      f"{path} has {size} tokens but config.json's vocab_size is {model_cfg.vocab_size}: the "
      "embedding has no row for some token ids"
    )
  return path


def copy_tokenizer(source_dir: str, target_dir: str) -> list[str]:
  os.makedirs(target_dir, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source_dir, name)):
      shutil.copy2(os.path.join(source_dir, name), os.path.join(target_dir, name))
      copied.append(name)
  return copied


def metadata(config, model_cfg: ModelConfig, checkpoint: HFCheckpoint) -> dict[str, Any]:
  """Checkpoint metadata of an import: parameters only, no data fingerprint (no data yet)."""
  return {
    "config": json.loads(config.to_json_best_effort()),
    "model_config": model_cfg.to_dict(),
    "data_fingerprint": None,
    "kind": "params",
    "source": {"hf_dir": checkpoint.path, "model_type": checkpoint.config.get("model_type")},
  }


def import_checkpoint(hf_dir: str, workdir: str, base: ml_collections.ConfigDict) -> dict[str, Any]:
  """Writes a Loom work directory holding ``hf_dir``'s weights (a parameters-only checkpoint at
  step 0), its tokenizer and the run config; returns what was written.

  ``base`` gives the numerics (model.dtype, param_dtype), the layer layout (model.scan_layers)
  and the mesh. Nothing is written unless the whole import succeeds: the work directory is built
  under WORKDIR.partial and renamed at the end.
  """
  checkpoint = HFCheckpoint(hf_dir)
  family = families.family_of(checkpoint.config, checkpoint.path)
  model_cfg = model_config(checkpoint, base)
  tokenizer = check_tokenizer(checkpoint, model_cfg)
  if tokenizer is None:
    log.warning(
      "%s has no tokenizer.json: the import keeps the config's data.tokenizer=%r, which "
      "generate, evaluate and training will use. For the model's own, save it as tokenizer.json "
      "(transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) and import again",
      checkpoint.path,
      base.data.tokenizer,
    )
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise ConversionError(f"--workdir {workdir} exists and is not empty; import into a new one")
  partial = workdir + ".partial"
  check_partial(partial)  # before any work: a user's folder there is never deleted
  # Validated as it will be trained (the tokenizer read from the HF directory for now).
  resolved = config_lib.validate(run_config(base, model_cfg, tokenizer and checkpoint.path))
  spec = state_lib.state_spec(model_cfg, optax.identity(), resolved.mesh, resolved.rules)
  params = load_params(checkpoint, family, spec, model_cfg)
  config = run_config(base, model_cfg, tokenizer and os.path.join(workdir, "tokenizer"))
  is_main = jax.process_index() == 0
  if is_main:
    storage.start_partial(partial)
    if tokenizer:
      copy_tokenizer(checkpoint.path, os.path.join(partial, "tokenizer"))
    with open(os.path.join(partial, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  multihost_utils.sync_global_devices("loom-import-partial")
  ckpt = Checkpointer(os.path.join(partial, "checkpoints"), max_to_keep=1, async_save=False)
  ckpt.save(0, {"params": params}, metadata(config, model_cfg, checkpoint))
  ckpt.wait()
  ckpt.close()
  multihost_utils.sync_global_devices("loom-import-written")
  if is_main:
    if os.path.isdir(workdir):
      os.rmdir(workdir)
    storage.finish_partial(partial, workdir)
  log.info("imported %s (%s) into %s", checkpoint.path, family.model_type, workdir)
  return {"workdir": workdir, "model_type": family.model_type, "model_config": model_cfg.to_dict()}
