"""Loom checkpoints out to Hugging Face: safetensors shards, config.json, the tokenizer.

``export_checkpoint(workdir, out_dir)`` restores a checkpoint's parameters sharded on this host's
mesh, gathers one HF tensor at a time to the host, and writes them in shards of at most
``max_shard_bytes`` (with ``model.safetensors.index.json`` when there are several), then
``config.json`` and ``generation_config.json`` in the family's form and the run's tokenizer files.
LoRA adapters are merged into their kernels first.
Everything is written to ``OUT_DIR.partial`` and renamed at the end: a failed export leaves
nothing in OUT_DIR.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from tokenizers import Tokenizer

from input_pipeline.host import storage
from models import lora
from models.config import ModelConfig
from train.hf import families
from train.hf.families import ConversionError, Family
from train.hf.importing import check_partial, copy_tokenizer
from train.hf.safetensors_io import write_shards
from train.inference import loading

log = logging.getLogger("loom")

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def family_for(cfg: ModelConfig, source: dict[str, Any] | None) -> Family:
  """The HF family to write: the imported one, else the one whose layout the model has."""
  if cfg.moe is not None:
    return _moe_family_for(cfg)
  if source and source.get("model_type") in families.FAMILIES:
    family = families.FAMILIES[source["model_type"]]
    if not family.moe:
      return family
  if cfg.positions == "learned" and cfg.norm == "layer" and cfg.mlp == "gelu" and cfg.use_bias:
    misfit = []  # what GPT-2's config cannot say: written anyway, transformers computes another
    if cfg.qk_norm:
      misfit.append("model.qk_norm=True (GPT-2 has no q/k norms)")
    if cfg.num_kv_heads != cfg.num_heads:
      misfit.append(f"model.num_kv_heads={cfg.num_kv_heads} (GPT-2: one per head, {cfg.num_heads})")
    if cfg.head_dim * cfg.num_heads != cfg.d_model:
      misfit.append(
        f"model.head_dim={cfg.head_dim} (GPT-2: d_model / num_heads = "
        f"{cfg.d_model / cfg.num_heads:g})"
      )
    if misfit:
      raise ConversionError(
        f"this model has GPT-2's layout but {'; '.join(misfit)}: no Hugging Face family Loom "
        "writes holds it"
      )
    return families.FAMILIES["gpt2"]
  if _llama_layout(cfg):
    if cfg.qk_norm and not cfg.qkv_bias:
      return families.FAMILIES["qwen3"]
    if cfg.qkv_bias and not cfg.qk_norm:
      return families.FAMILIES["qwen2"]
    if not cfg.qk_norm:
      return families.FAMILIES["llama"]
  raise ConversionError(
    f"this model (positions={cfg.positions}, norm={cfg.norm}, mlp={cfg.mlp}, use_bias="
    f"{cfg.use_bias}, qk_norm={cfg.qk_norm}, qkv_bias={cfg.qkv_bias}) matches no Hugging Face "
    f"family Loom writes ({', '.join(sorted(families.FAMILIES))})"
  )


def _llama_layout(cfg: ModelConfig) -> bool:
  return cfg.positions == "rope" and cfg.norm == "rms" and cfg.mlp == "swiglu" and not cfg.use_bias


def _moe_family_for(cfg: ModelConfig) -> Family:
  """Qwen3-MoE with QK-norm, Mixtral without (its top-k weights always renormalised); a router,
  shared experts or block that neither has is refused, named. The dispatch is not the
  architecture: HF runs every assignment, as Loom's dropless dispatch does."""
  moe, unexpressed = cfg.moe, []
  if moe.router != "softmax":
    unexpressed.append(f"model.moe.router={moe.router!r}")
  if moe.shared_experts:
    unexpressed.append(f"model.moe.shared_experts={moe.shared_experts}")
  if moe.first_dense:
    unexpressed.append(f"model.moe.first_dense={moe.first_dense}")
  if not _llama_layout(cfg) or cfg.qkv_bias:
    unexpressed.append(
      f"positions={cfg.positions}, norm={cfg.norm}, mlp={cfg.mlp}, use_bias={cfg.use_bias}, "
      f"qkv_bias={cfg.qkv_bias}"
    )
  if not cfg.qk_norm and not moe.norm_topk:
    unexpressed.append("model.moe.norm_topk=False without model.qk_norm")
  if unexpressed:
    raise ConversionError(
      f"this mixture-of-experts model ({'; '.join(unexpressed)}) matches no Hugging Face MoE "
      "family Loom writes: Mixtral (a softmax router with its top-k weights renormalised, SwiGLU "
      "experts, no shared ones, Llama's attention) or Qwen3-MoE (the same with QK-norm, "
      "norm_topk either way)"
    )
  return families.FAMILIES["qwen3_moe" if cfg.qk_norm else "mixtral"]


def _host(array: jax.Array) -> np.ndarray:
  """The whole array on this host (gathered from every process's shards)."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(array))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def hf_tensors(params: Any, cfg: ModelConfig, family: Family, dtype) -> Iterator[tuple[str, Any]]:
  """(HF name, host array) for every tensor of the HF checkpoint, one at a time."""

  def leaf(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
      tree = tree[key]
    return tree

  def emit(name: str, rule, get) -> tuple[str, Any]:
    sources, transform = rule
    return name, transform(*(get(s) for s in sources)).astype(dtype)

  for name, rule in family.top_export(cfg).items():
    yield emit(name, rule, lambda s: _host(leaf(params, s)))
  blocks = params["blocks"]
  for i in range(cfg.num_layers):
    prefix = family.block_prefix.format(i=i)
    if cfg.scan_layers:
      get = lambda s, i=i: _host(leaf(blocks, s)[i])  # noqa: E731 (one layer of a stacked leaf)
    else:
      layer = blocks[i] if isinstance(blocks, list) else blocks[str(i) if str(i) in blocks else i]
      get = lambda s, layer=layer: _host(leaf(layer, s))  # noqa: E731
    get = _last_one(get)  # an MoE layer's experts are cut from one kernel, gathered once
    for name, rule in family.block_export(cfg).items():
      yield emit(prefix + name, rule, get)


def _last_one(fetch: Callable[[str], np.ndarray]) -> Callable[[str], np.ndarray]:
  """``fetch`` that remembers its last result (one parameter's layer on the host at a time)."""
  last: dict[str, np.ndarray] = {}

  def get(source: str) -> np.ndarray:
    if source not in last:
      last.clear()
      last[source] = fetch(source)
    return last[source]

  return get


def export_checkpoint(
  workdir: str,
  out_dir: str,
  *,
  step: int | None = None,
  dtype: str = "float32",
  max_shard_bytes: int = 5 * 10**9,
) -> dict[str, Any]:
  """Writes an HF model directory for a Loom checkpoint; returns what was written."""
  if dtype not in DTYPES:
    raise ConversionError(f"--dtype={dtype!r} is not one of {sorted(DTYPES)}")
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ConversionError(f"{out_dir} exists and is not an empty directory; choose a new one")
  if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
    raise ConversionError(f"--max_shard_bytes={max_shard_bytes} must be a positive integer")
  partial = out_dir + ".partial"
  check_partial(partial)  # before any work: a user's folder there is never deleted
  model = loading.load(workdir, step)
  cfg, config, params = model.model_cfg, model.config, model.params
  if cfg.lora_rank > 0:  # adapters folded into their kernels: a plain model for transformers
    params = lora.merge(params, cfg)
    cfg = dataclasses.replace(cfg, lora_rank=0)
  family = family_for(cfg, model.metadata.get("source"))
  if cfg.quant != "none":
    log.warning(
      "model.quant=%r: the exported model's projections run unquantised in transformers (the "
      "parameters are the same); its logits differ from Loom's quantised forward by the %s "
      "rounding error",
      cfg.quant,
      cfg.quant,
    )
  is_main = jax.process_index() == 0
  if is_main:
    storage.start_partial(partial)
  tensors = hf_tensors(params, cfg, family, DTYPES[dtype])
  if is_main:
    files = write_shards(tensors, partial, max_shard_bytes=max_shard_bytes)
  else:
    for _ in tensors:  # every process takes part in each gather
      pass
  if not is_main:
    return {}
  eod = model.tokenizer.eod_id
  extra = {"torch_dtype": dtype, "eos_token_id": eod, "bos_token_id": _bos(config, eod)}
  with open(os.path.join(partial, "config.json"), "w", encoding="utf-8") as f:
    json.dump(families.hf_config_from_model(cfg, family, extra), f, indent=2)
  with open(os.path.join(partial, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token_id": extra["bos_token_id"], "eos_token_id": eod}, f, indent=2)
  tokenizer = config.data.tokenizer
  copied = copy_tokenizer(tokenizer[3:], partial) if tokenizer.startswith("hf:") else []
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)
  storage.finish_partial(partial, out_dir)
  return {
    "out_dir": out_dir,
    "step": model.step,
    "model_type": family.model_type,
    "files": files,
    "tokenizer_files": copied,
  }


def _bos(config, eod: int) -> int:
  """The tokenizer's bos id where it has one, else the end-of-document id."""
  tokenizer = config.data.tokenizer
  if tokenizer.startswith("hf:"):
    path = os.path.join(tokenizer[3:], "tokenizer_config.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        bos = json.load(f).get("bos_token")
      if isinstance(bos, dict):
        bos = bos.get("content")
      if bos:
        found = Tokenizer.from_file(os.path.join(tokenizer[3:], "tokenizer.json")).token_to_id(bos)
        if found is not None:
          return found
  return eod
