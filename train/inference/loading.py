"""Loading a checkpoint for inference: the params only, restored sharded on this host's mesh.

Library (Colab)::

  from train.inference import generation, loading
  model = loading.load("/content/run")             # latest checkpoint, sharded on this mesh
  result = generation.generate(model, ["def ", "class "], max_new_tokens=64, temperature=0.8)
  result.texts, result.stats
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
import optax
import orbax.checkpoint as ocp
from flax import nnx

from input_pipeline import preparation, tokenizers
from input_pipeline.host import agreement
from models.config import ModelConfig
from train import config as config_lib
from train import state as state_lib
from train.checkpoint import integrity, manager
from train.cluster import mesh as mesh_lib
from train.inference.engine import Engine

log = logging.getLogger("loom")


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
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # the checkpoint's


def load(
  workdir: str, step: int | None = None, *, mesh_config: Any = None, weights: str = "params"
) -> Model:
  """Restores the params (only) of ``step`` (default: the latest) sharded on this host's mesh;
  ``weights="reference"``: the frozen reference a DPO run keeps (its starting weights).

  The mesh comes from the run's saved config unless ``mesh_config`` is given; if the saved sizes
  do not fit the devices here, all devices go to fsdp. The tokenizer is rebuilt from the saved
  config (``input_pipeline.build``) and must match the run's data fingerprint; an imported
  checkpoint (no data yet) needs only its tokenizer.
  """
  if weights not in ("params", "reference"):
    raise ValueError(f"weights={weights!r}: give 'params' (the policy) or 'reference'")
  ckpt_manager, steps = manager.open_read_only(workdir)
  if step is None:
    # The oldest of the processes' latest steps, for every process: a save of a live run may
    # land between two processes' listings, and each would restore its shards of another step.
    step = min(int(s) for s in agreement.gather("load-latest-step", str(steps[-1])))
  if step not in steps:
    raise ValueError(f"--step {step} has no checkpoint in {workdir}; available steps: {steps}")
  # The same integrity check as the trainer's restore: never sample from a corrupted checkpoint.
  problems = integrity.verify(os.path.join(ckpt_manager.directory, str(step)))
  if problems:
    raise ValueError(
      f"checkpoint at step {step} fails its checksums: {'; '.join(problems)}. Check it with "
      f"python -m train.checkpoint verify {workdir}, or pass another --step from {steps}"
    )
  metadata = ckpt_manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  metadata = metadata["metadata"]
  config = ml_collections.ConfigDict(metadata["config"])
  model_cfg = config_lib.saved_model_config(metadata["model_config"]).for_inference()

  tokenizer = _tokenizer(config, metadata, workdir)
  mesh, rules = _mesh_for(config.mesh if mesh_config is None else mesh_config)
  # Only the params are restored: the optimizer's shape is irrelevant, identity has no state.
  spec = state_lib.state_spec(model_cfg, optax.identity(), mesh, rules, seed=config.seed)
  params = manager.restore_params(ckpt_manager, step, spec.abstract["params"], weights)
  if any(not isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params)):
    ckpt_manager.close()  # a partial restore leaves what the checkpoint lacks as placeholders
    raise ValueError(
      f"the checkpoint at step {step} in {workdir} holds no {weights!r} weights: only a DPO or "
      "GRPO run without LoRA keeps a reference copy (with LoRA the reference is the policy "
      "with its adapters off; SimPO and kl_coef=0 keep none); load weights='params'"
    )
  ckpt_manager.close()
  engine = Engine(spec.graphdef, model_cfg, mesh, rules)
  return Model(
    params,
    spec.graphdef,
    model_cfg,
    tokenizer,
    mesh,
    rules,
    step,
    config,
    engine,
    metadata,
  )


def for_inference(graphdef: nnx.GraphDef, model_cfg: ModelConfig):
  """(graphdef, model_cfg) of a training run's model as inference runs it: an MoE's dispatch
  dropless (``ModelConfig.for_inference``: a row's result never depends on its batch)."""
  inference_cfg = model_cfg.for_inference()
  if inference_cfg == model_cfg:
    return graphdef, model_cfg
  return state_lib.graphdef_for(inference_cfg), inference_cfg


def _mesh_for(mesh_config: Any) -> tuple[jax.sharding.Mesh, mesh_lib.Rules]:
  rules = mesh_lib.logical_rules(mesh_config)
  mesh_config = unstaged(mesh_config)
  try:
    return mesh_lib.make_mesh(mesh_config), rules
  except ValueError as e:
    log.warning("the run's mesh does not fit here (%s); using fsdp over all devices", e)
    fallback = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return mesh_lib.make_mesh(fallback), rules


def unstaged(mesh_config: Any) -> Any:
  """A training mesh for inference: its stage and context devices go to fsdp.

  Generation and scoring run the layers in order (models/pipeline.py pipelines only the
  training forward pass) on whole rows of any length (models/context_parallel.py needs rows a
  multiple of the context axis); both axes would leave devices waiting on each other.
  """
  folded_axes = (mesh_lib.STAGE, mesh_lib.CONTEXT)
  sizes = {a: (mesh_config.get(a, 1), mesh_config.get(f"dcn_{a}", 1)) for a in folded_axes}
  if all(size == (1, 1) for size in sizes.values()):
    return mesh_config
  folded = ml_collections.ConfigDict(mesh_config.to_dict())
  for axis, (ici, dcn) in sizes.items():
    folded[axis], folded[f"dcn_{axis}"] = 1, 1
    if ici == -1:  # the rest of a slice's devices: fsdp takes them instead
      folded.fsdp = -1
    elif folded.fsdp != -1:
      folded.fsdp *= ici
    folded.dcn_fsdp = folded.get("dcn_fsdp", 1) * dcn
  return folded


def _tokenizer(config: ml_collections.ConfigDict, metadata: dict[str, Any], workdir: str) -> Any:
  """The run's tokenizer: rebuilt with its data (fingerprint checked), or alone for an import, a
  GRPO run (its fingerprint is its prompt files', train/rl/loop.py, and its tokenizer was loaded
  alone: ``data.source`` fed it nothing) or a chat:/prefs: run, whose tokenizer never depends on
  its data (a SentencePiece model must be given: input_pipeline/pipeline.py), and whose data
  fingerprint changes with the way conversations are tokenized, not with the tokenizer."""
  grpo = config.get("train", {}).get("objective") == "grpo"
  source = str(config.get("data", {}).get("source", ""))
  conversations = source.startswith(("chat:", "prefs:")) and not tuple(
    config.data.get("mixture", ())
  )
  if metadata.get("data_fingerprint") is None or grpo or conversations:
    kind, own = str(config.data.tokenizer), os.path.join(workdir, "tokenizer")
    moved = kind.startswith("hf:") and not os.path.exists(kind[3:])
    if moved and os.path.isfile(os.path.join(own, "tokenizer.json")):
      # An import names its copy of the tokenizer by its absolute path: the (local) work
      # directory was moved or copied since, and its own copy is beside the checkpoint.
      config = config.copy_and_resolve_references()
      config.data.tokenizer = f"hf:{own}"
    return tokenizers.load_tokenizer(config.data)
  pipeline = preparation.build(config)
  if pipeline.fingerprint != metadata["data_fingerprint"]:
    raise ValueError(
      f"the tokenizer rebuilt from {workdir}'s config has data fingerprint "
      f"{pipeline.fingerprint[:16]}, the checkpoint {metadata['data_fingerprint'][:16]}: the data "
      f"or tokenizer under data.cache_dir={config.data.cache_dir} changed since training"
    )
  return pipeline.tokenizer
