"""The frozen, typed model config. The model never reads a ConfigDict; it sees only this."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from models import pipeline

NORMS = ("rms", "layer")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned")
# What a rematerialised block keeps for the backward pass: nothing ("full"), the outputs of
# matmuls with weights ("save_dots"), or the named outputs of attention and/or the MLP.
REMATS = ("none", "full", "save_dots", "save_attention", "save_mlp", "save_attention_mlp")
# Attention kernels (models/attention.py): "auto" picks per backend and dtype when traced.
ATTENTIONS = ("auto", "xla", "cudnn", "splash")
# Attention over a row split by the context mesh axis (models/context_parallel.py).
ATTENTION_CONTEXTS = ("all_gather", "ring")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "llama3")
# The projections' matmuls in a low format, forward and backward (models/quant.py).
QUANTS = ("none", "fp8", "int8")
# Fields that say how the forward pass is laid out over devices, not what the model computes
# (the same function to float rounding): a checkpoint resumes under any values of them
# (train/checkpoint/manager.py).
# The pipeline's fields come from the run config's ``pipeline`` group, not ``model``: they are
# not part of ``to_dict`` (checkpoint metadata, imports, init_from compare model groups).
PIPELINE_FIELDS = ("pipeline_microbatches", "pipeline_repeats")
SCHEDULE_FIELDS = (*PIPELINE_FIELDS, "attention_context")


ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("auto", "dropless", "capacity")  # auto: models/moe.py resolve_dispatch


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """An MoE layer's shape and routing (``model.moe.*`` in the run config; models/moe.py)."""

  num_experts: int  # E
  experts_per_token: int  # K
  expert_dim: int  # F, each expert's hidden width
  shared_experts: int  # experts every token passes through (Qwen2-MoE, DeepSeek), width F each
  first_dense: int  # the first layers keep a dense MLP (DeepSeek-V3: 3); the rest are MoE
  router: str  # ROUTERS
  norm_topk: bool
  dispatch: str  # DISPATCHES
  capacity_factor: float
  # Weights of the router's losses in the training loss, and the sigmoid router's bias step.
  balance_loss: float
  router_z_loss: float
  bias_rate: float

  def validate(self) -> None:
    """Raises ValueError naming the ``model.moe`` key, its value and what would be valid."""
    for name in ("num_experts", "experts_per_token", "expert_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.moe.{name}={value!r}: must be a positive integer")
    if self.experts_per_token > self.num_experts:
      raise ValueError(
        f"model.moe.experts_per_token={self.experts_per_token} exceeds model.moe.num_experts="
        f"{self.num_experts}: each token picks at most every expert"
      )
    for name in ("shared_experts", "first_dense"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"model.moe.{name}={value!r}: must be an integer >= 0")
    if self.router not in ROUTERS:
      raise ValueError(f"model.moe.router={self.router!r}: must be one of {', '.join(ROUTERS)}")
    if self.dispatch not in DISPATCHES:
      raise ValueError(
        f"model.moe.dispatch={self.dispatch!r}: must be one of {', '.join(DISPATCHES)}"
      )
    finite = lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not (finite(self.capacity_factor) and self.capacity_factor > 0):
      raise ValueError(
        f"model.moe.capacity_factor={self.capacity_factor!r}: must be a finite number > 0 "
        "(dispatch='dropless' drops nothing)"
      )
    for name in ("balance_loss", "router_z_loss", "bias_rate"):
      value = getattr(self, name)
      if not (finite(value) and value >= 0):
        raise ValueError(f"model.moe.{name}={value!r}: must be a finite number >= 0 (0 = off)")

  def for_inference(self) -> MoEConfig:
    """Inference runs every assignment (``dropless``): with ``capacity`` (and ``auto`` on a CPU)
    a row's tokens could be dropped for the rows beside it, so that its logits, samples and
    scores would depend on the batch it came in."""
    return dataclasses.replace(self, dispatch="dropless")

  def capacity(self, tokens: int) -> int:
    """C: how many assignments each expert takes in ``capacity`` dispatch."""
    assignments = tokens * self.experts_per_token
    return max(1, math.ceil(self.capacity_factor * assignments / self.num_experts))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a decoder-only transformer (shapes in names: B, L, D, N, K, H, F, V).

  Every field is required: the values, with their defaults, come from the run config's ``model``
  group (``configs/default.py`` declares each once); ``from_config`` builds this from it.
  """

  vocab_size: int  # V
  d_model: int  # D
  num_layers: int
  num_heads: int  # N
  num_kv_heads: int  # K (divides N)
  head_dim: int  # H
  mlp_dim: int  # F
  max_seq_len: int
  mlp: str
  norm: str
  norm_eps: float
  positions: str
  rope_theta: float
  # Llama 3.1/3.2 long-context RoPE: low frequencies divided by the factor, high ones kept, a
  # smooth ramp between (wavelengths against original_max_len / low and / high freq factors).
  rope_scaling: str
  rope_scaling_factor: float
  rope_low_freq_factor: float
  rope_high_freq_factor: float
  rope_original_max_len: int
  qk_norm: bool
  tie_embeddings: bool
  use_bias: bool  # biases on every dense layer and norm (GPT-2)
  qkv_bias: bool  # biases on the query, key and value projections only (Qwen2)
  dtype: str
  param_dtype: str
  scan_layers: bool
  remat: str
  # Causal attention by blocks of this many queries, skipping the key blocks above the diagonal
  # (0 = whole rows). Exact; on a 2-core CPU at R's shape 2.4x faster per layer at 64.
  attention_block: int
  attention: str
  attention_context: str  # ATTENTION_CONTEXTS: the form used when the context axis splits rows
  # Packed documents per row that cuDNN attention is compiled for (its ragged form's bound).
  max_segments: int
  quant: str  # "none", "fp8" (rowwise current scaling) or "int8" (per-channel)
  quant_emulation: bool  # the quant may run emulated where the chips have no such units
  init_std: float
  # Low-rank adapters: rank > 0 adds A·B·alpha/rank beside each targeted kernel; only adapters
  # train (models/lora.py). Targets: q, k, v, out (attention), gate, up, down (MLP).
  lora_rank: int
  lora_alpha: float
  lora_targets: tuple[str, ...]
  # Mixture of experts in every layer's place of the MLP, or None (model.moe.num_experts = 0).
  moe: MoEConfig | None
  # The training forward pass's schedule when the mesh splits the layers into stages
  # (models/pipeline.py). From the run config's ``pipeline`` group, not ``model``; hence the
  # defaults (a model built without one, or saved before it, has no pipeline schedule).
  pipeline_microbatches: int = -1  # -1: one per stage
  pipeline_repeats: int = 1  # 1: GPipe; R > 1: the circular schedule, R rounds of the stages

  def __post_init__(self):
    # JSON (checkpoint metadata) turns the tuple into a list; the config must stay hashable.
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    object.__setattr__(self, "moe", _moe_config(self.moe, self.mlp_dim))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the field, its value and what would be valid."""
    for name in (
      "vocab_size",
      "d_model",
      "num_layers",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_dim",
      "max_seq_len",
      "max_segments",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{name}={value!r} must be a positive integer")
    choices = {
      "mlp": MLPS,
      "norm": NORMS,
      "positions": POSITIONS,
      "remat": REMATS,
      "attention": ATTENTIONS,
      "attention_context": ATTENTION_CONTEXTS,
      "dtype": DTYPES,
      "param_dtype": DTYPES,
      "rope_scaling": ROPE_SCALINGS,
      "quant": QUANTS,
    }
    for name, valid in choices.items():
      if getattr(self, name) not in valid:
        raise ValueError(f"model.{name}={getattr(self, name)!r} is not one of {valid}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads="
        f"{self.num_kv_heads}; use a divisor of {self.num_heads} (1 = multi-query, "
        f"{self.num_heads} = multi-head)"
      )
    if not isinstance(self.attention_block, int) or self.attention_block < 0:
      raise ValueError(
        f"model.attention_block={self.attention_block!r} must be an integer >= 0 (0 = whole rows)"
      )
    targets = ("q", "k", "v", "out", "gate", "up", "down")
    unknown = [t for t in self.lora_targets if t not in targets]
    if self.lora_rank < 0 or unknown or (self.lora_rank and not self.lora_targets):
      raise ValueError(
        f"model.lora_rank={self.lora_rank} / model.lora_targets={self.lora_targets}: the rank "
        f"must be >= 0 (0 = off) and the targets a non-empty subset of {targets}"
      )
    if not self.norm_eps > 0:
      raise ValueError(f"model.norm_eps={self.norm_eps!r} must be > 0")
    if self.positions == "rope":
      if not self.rope_theta > 0:
        raise ValueError(f"model.rope_theta={self.rope_theta!r} must be > 0 (RoPE's base)")
      if self.rope_scaling == "llama3" and not (
        self.rope_scaling_factor > 0
        and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        and self.rope_original_max_len > 0
      ):
        raise ValueError(
          f"model.rope_scaling='llama3' needs rope_scaling_factor > 0 (got "
          f"{self.rope_scaling_factor!r}), 0 < rope_low_freq_factor < rope_high_freq_factor "
          f"(got {self.rope_low_freq_factor!r}, {self.rope_high_freq_factor!r}) and "
          f"rope_original_max_len > 0 (got {self.rope_original_max_len!r})"
        )
    # The schedule's own values here; against the stages, where the mesh is known (train/config.py).
    pipeline.check(self.num_layers, 1, self.pipeline_microbatches, self.pipeline_repeats)
    if self.positions == "rope" and self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
    if self.moe is not None:
      self.moe.validate()
      if self.moe.first_dense >= self.num_layers:
        raise ValueError(
          f"model.moe.first_dense={self.moe.first_dense} leaves no MoE layer of "
          f"model.num_layers={self.num_layers}; use fewer dense layers, or model.moe.num_experts=0"
        )
      adapted = sorted({"gate", "up", "down"} & set(self.lora_targets))
      if self.lora_rank and adapted:
        raise ValueError(
          f"model.lora_targets={self.lora_targets}: {adapted} are MLP kernels, which an MoE "
          f"model (model.moe.num_experts={self.moe.num_experts}) does not have; adapt q, k, v, out"
        )
      if self.quant != "none":
        raise ValueError(
          f"model.quant={self.quant!r}: the experts of an MoE model (model.moe.num_experts="
          f"{self.moe.num_experts}) run unquantised; use model.quant='none'"
        )

  @classmethod
  def from_config(
    cls, model: Any, *, seq_len: int, vocab_size: int, pipeline: Any = None
  ) -> ModelConfig:
    """Builds the model config from the ``config.model`` group, resolving its -1 defaults.

    Args:
      model: the ``config.model`` ConfigDict (or any mapping with the same keys).
      seq_len: ``config.data.seq_len``, the default for ``max_seq_len``.
      vocab_size: the tokenizer's vocabulary size, the default for ``vocab_size``.
      pipeline: the ``config.pipeline`` group (microbatches, repeats), or None for none.
    """
    values = dict(model)
    if pipeline is not None:
      values["pipeline_microbatches"] = pipeline["microbatches"]
      values["pipeline_repeats"] = pipeline["repeats"]
    if values["vocab_size"] == -1:
      values["vocab_size"] = vocab_size
    if values["num_kv_heads"] == -1:
      values["num_kv_heads"] = values["num_heads"]
    if values["head_dim"] == -1:
      if values["d_model"] % values["num_heads"]:
        raise ValueError(
          f"model.d_model={values['d_model']} is not divisible by model.num_heads="
          f"{values['num_heads']}; set model.head_dim explicitly or change one of them"
        )
      values["head_dim"] = values["d_model"] // values["num_heads"]
    if values["max_seq_len"] == -1:
      values["max_seq_len"] = seq_len
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(fields)}")
    missing = sorted(fields - set(values) - set(PIPELINE_FIELDS))
    if missing:
      raise ValueError(
        f"model config keys {missing} are missing: a config file's model group starts from "
        f"configs/default.py's, which declares every key"
      )
    return cls(**values)

  def for_inference(self) -> ModelConfig:
    """The config generation and scoring build the model from: an MoE's dispatch dropless
    (``MoEConfig.for_inference``), the parameters the same."""
    return self if self.moe is None else dataclasses.replace(self, moe=self.moe.for_inference())

  def to_dict(self) -> dict[str, Any]:
    """The ``model`` group's fields (the pipeline's, from another group, left out)."""
    out = dataclasses.asdict(self)
    for name in PIPELINE_FIELDS:
      del out[name]
    return out


def _moe_config(value: Any, mlp_dim: int) -> MoEConfig | None:
  """The ``model.moe`` group (a mapping, from a config or JSON) as a MoEConfig, None when dense;
  its expert_dim -1 is the dense MLP's width."""
  if value is None or isinstance(value, MoEConfig):
    return value
  values = dict(value)
  if values.get("num_experts") == 0:
    return None
  values.setdefault("first_dense", 0)  # saved by runs from before the key: every layer MoE
  fields = {f.name for f in dataclasses.fields(MoEConfig)}
  unknown, missing = sorted(set(values) - fields), sorted(fields - set(values))
  if unknown or missing:
    raise ValueError(
      f"model.moe: unknown keys {unknown}, missing keys {missing}; valid keys: {sorted(fields)}"
    )
  if values["expert_dim"] == -1:
    values["expert_dim"] = mlp_dim
  return MoEConfig(**values)
