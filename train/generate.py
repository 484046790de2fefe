"""Sampling from a trained checkpoint with a KV cache, on the training mesh, metered.

``python -m train.generate --workdir DIR --prompt TEXT [--prompt TEXT ...] [--prompts_file F]
[--step N] [--max_new_tokens 128] [--temperature 1.0 | --greedy] [--top_k 0] [--top_p 1.0]
[--seed 0] [--json]``

Library (Colab)::

  from train import generate
  model = generate.load("/content/run")              # latest checkpoint, sharded on this mesh
  result = generate.generate(model, ["def ", "class "], max_new_tokens=64, temperature=0.8)
  result.texts, result.stats

This module loads a checkpoint and turns text into text; the pieces live in ``train/sampling.py``
(temperature, top-k, top-p), ``train/inference.py`` (the compiled prefill/decode engine, and how a
batch of prompts of different lengths stays exact) and ``train/inference_meter.py`` (the meter).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import input_pipeline
from models.config import ModelConfig
from train import checkpointing, energy
from train import mesh as mesh_lib
from train import state as state_lib

# Re-exported from their new modules so ``generate.X`` keeps working (train/loop.py, tests, Colab).
from train.inference import (
  CACHE_BUCKET,
  Engine,
  Generation,
  check_prompts,
  chunk_lengths,
  sample_for_eval,
)
from train.inference_meter import inference_stats, measure_copy_bandwidth
from train.sampling import Sampling, filter_logits, sample

__all__ = [
  "CACHE_BUCKET",
  "Engine",
  "Generation",
  "Model",
  "Result",
  "Sampling",
  "check_prompts",
  "checkpoint_steps",
  "chunk_lengths",
  "filter_logits",
  "generate",
  "inference_stats",
  "load",
  "main",
  "measure_copy_bandwidth",
  "sample",
  "sample_for_eval",
]

log = logging.getLogger("loom")


# --- loading a checkpoint ---


@dataclasses.dataclass
class Model:
  """A restored model ready to sample from: params on the mesh, the tokenizer of its run."""

  params: Any
  graphdef: nnx.GraphDef
  model_cfg: ModelConfig
  tokenizer: Any
  mesh: jax.sharding.Mesh
  rules: mesh_lib.Rules
  step: int
  config: ml_collections.ConfigDict
  engine: Engine


def checkpoint_steps(workdir: str) -> tuple[ocp.CheckpointManager, list[int]]:
  """A read-only view of ``workdir/checkpoints`` and its complete steps (error if none)."""
  directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"--workdir {workdir} has no checkpoints ({directory} does not exist); train first with "
      f"python -m train --workdir {workdir}"
    )
  # Read-only: generation must never create, clean up or delete anything in a run's directory.
  manager = ocp.CheckpointManager(
    directory,
    item_names=("state", "metadata"),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"--workdir {workdir} has no complete checkpoint in {directory}")
  return manager, steps


def load(workdir: str, step: int | None = None, *, mesh_config: Any = None) -> Model:
  """Restores the params (only) of ``step`` (default: the latest) sharded on this host's mesh.

  The mesh comes from the run's saved config unless ``mesh_config`` is given; if the saved sizes
  do not fit the devices here, all devices go to fsdp. The tokenizer is rebuilt from the saved
  config (``input_pipeline.build``) and must match the run's data fingerprint.
  """
  manager, steps = checkpoint_steps(workdir)
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"--step {step} has no checkpoint in {workdir}; available steps: {steps}")
  # The same integrity check as the trainer's restore: never sample from a corrupted checkpoint.
  problems = checkpointing.verify(os.path.join(manager.directory, str(step)))
  if problems:
    raise ValueError(
      f"checkpoint at step {step} fails its checksums: {'; '.join(problems)}. Check it with "
      f"python -m train.ckpt verify {workdir}, or pass another --step from {steps}"
    )
  metadata = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  metadata = metadata["metadata"]
  config = ml_collections.ConfigDict(metadata["config"])
  model_cfg = ModelConfig(**metadata["model_config"])

  pipeline = input_pipeline.build(config)
  if pipeline.fingerprint != metadata["data_fingerprint"]:
    raise ValueError(
      f"the tokenizer rebuilt from {workdir}'s config has data fingerprint "
      f"{pipeline.fingerprint[:16]}, the checkpoint {metadata['data_fingerprint'][:16]}: the data "
      f"or tokenizer under data.cache_dir={config.data.cache_dir} changed since training"
    )
  mesh, rules = _mesh_for(config.mesh if mesh_config is None else mesh_config)
  # Only the params are restored: the optimizer's shape is irrelevant, identity has no state.
  spec = state_lib.state_spec(model_cfg, optax.identity(), mesh, rules, seed=config.seed)
  abstract = {"params": spec.abstract["params"]}
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,
      )
    ),
  )
  manager.close()
  engine = Engine(spec.graphdef, model_cfg, mesh, rules)
  return Model(
    restored["state"]["params"],
    spec.graphdef,
    model_cfg,
    pipeline.tokenizer,
    mesh,
    rules,
    step,
    config,
    engine,
  )


def _mesh_for(mesh_config: Any) -> tuple[jax.sharding.Mesh, mesh_lib.Rules]:
  rules = mesh_lib.logical_rules(mesh_config)
  try:
    return mesh_lib.make_mesh(mesh_config), rules
  except ValueError as e:
    log.warning("the run's mesh does not fit here (%s); using fsdp over all devices", e)
    fallback = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return mesh_lib.make_mesh(fallback), rules


# --- the library entry point ---


@dataclasses.dataclass
class Result:
  texts: list[str]
  tokens: list[list[int]]
  stop_reasons: list[str]
  stats: dict[str, Any]  # the inference meter (see inference_stats)
  logits: list[np.ndarray] | None = None  # per prompt [generated, V], when record_logits


def generate(
  model: Model,
  prompts: Sequence[str],
  *,
  max_new_tokens: int = 128,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stream: Callable[[int, str], None] | None = None,
  record_logits: bool = False,
  measure_bandwidth: bool = True,
) -> Result:
  """Samples continuations of ``prompts`` (strings); returns texts and the inference meter.

  stream(row, text) receives each row's new text as its tokens arrive (held back while a
  multi-byte character is incomplete).
  """
  sampling = Sampling(temperature, top_k, top_p)
  tokenizer = model.tokenizer
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f"prompt {i} is empty; give at least one character")
  ids = [tokenizer.encode(p) for p in prompts]
  printer = _StreamDecoder(tokenizer, len(prompts), stream) if stream else None
  span = energy.EnergySpan.start()
  out = model.engine.run(
    model.params,
    ids,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    seed=seed,
    eod_id=tokenizer.eod_id,
    on_token=printer.add if printer else None,
    record_logits=record_logits,
  )
  measured = span.measured_joules()
  if printer:
    printer.flush()
  stats = inference_stats(
    model,
    out,
    prompt_tokens=sum(map(len, ids)),
    measured_joules=measured,
    measured_by=span.counter.source if span.counter else "",
    measure_bandwidth=measure_bandwidth,
  )
  texts = [tokenizer.decode(t) for t in out.tokens]
  return Result(texts, out.tokens, out.stop_reasons, stats, out.logits)


class _StreamDecoder:
  """Turns token ids into text deltas per row, holding back incomplete UTF-8 sequences."""

  def __init__(self, tokenizer, rows: int, emit: Callable[[int, str], None]):
    self.tokenizer, self.emit = tokenizer, emit
    self.ids: list[list[int]] = [[] for _ in range(rows)]
    self.shown = [0] * rows

  def add(self, row: int, token: int) -> None:
    self.ids[row].append(token)
    text = self.tokenizer.decode(self.ids[row])
    if not text.endswith("\ufffd"):
      self._show(row, text)

  def flush(self) -> None:
    for row, ids in enumerate(self.ids):
      self._show(row, self.tokenizer.decode(ids))

  def _show(self, row: int, text: str) -> None:
    if len(text) > self.shown[row]:
      self.emit(row, text[self.shown[row] :])
      self.shown[row] = len(text)


# --- the command line ---


def _read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
  texts = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise FileNotFoundError(f"--prompts_file {prompts_file}: no such file")
    with open(prompts_file, encoding="utf-8") as f:
      texts += [line.rstrip("\n") for line in f if line.strip()]
  if not texts:
    raise ValueError("no prompts given; pass --prompt TEXT (repeatable) or --prompts_file FILE")
  return texts


def main(argv: Sequence[str]) -> None:
  from absl import flags
  from absl import logging as absl_logging

  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax/TFDS chatter would bury the text
  code = 0
  try:
    prompts = _read_prompts(f.prompt or [], f.prompts_file)
    sampling = Sampling(0.0 if f.greedy else f.temperature, f.top_k, f.top_p)
    model = load(f.workdir, f.step)
    single = len(prompts) == 1

    def stream(row: int, text: str) -> None:
      print(text, end="", flush=True)

    if single and not f.json:
      print(prompts[0], end="", flush=True)
    result = generate(
      model,
      prompts,
      max_new_tokens=f.max_new_tokens,
      temperature=sampling.temperature,
      top_k=sampling.top_k,
      top_p=sampling.top_p,
      seed=f.seed,
      stream=stream if single and not f.json else None,
    )
    if single and not f.json:
      print()
    elif not f.json:
      for prompt, text in zip(prompts, result.texts, strict=True):
        print(f"--- {prompt!r}\n{prompt}{text}\n")
    stats = result.stats
    if f.json:
      print(
        json.dumps(
          {"texts": result.texts, "prompts": prompts, "stop_reasons": result.stop_reasons, **stats}
        )
      )
    else:
      print(_summary(stats), file=sys.stderr)
  except (ValueError, FileNotFoundError) as e:
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    code = 2
  sys.exit(code)


def _summary(stats: dict[str, Any]) -> str:
  decode = stats["decode_tokens_per_second"]
  util = stats["bandwidth_utilisation"]
  per_1k = stats["energy_kwh_per_1k_tokens"]
  return (
    f"[step {stats['step']}] prefill {stats['prefill_tokens_per_second']:,.0f} tok/s, first "
    f"token {stats['time_to_first_token_s'] * 1e3:.1f} ms, decode "
    f"{'n/a' if decode is None else f'{decode:,.1f}'} tok/s (measured), "
    f"{stats['flops_per_generated_token']:,} FLOPs/token (estimated), bandwidth "
    f"{'n/a' if util is None else f'{util:.1%}'} of measured copy, "
    f"{'n/a' if per_1k is None else f'{per_1k:.3g}'} kWh per 1k tokens ({stats['energy_source']})"
  )


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.", required=True)
  flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for a batch).")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
  flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0 = greedy).")
  flags.DEFINE_boolean("greedy", False, "Always take the most likely token (temperature 0).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", 1.0, "Sample within the nucleus of this probability mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_boolean("json", False, "Print one JSON object last (texts and the meter).")


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
