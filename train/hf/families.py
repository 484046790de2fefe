"""The Hugging Face model families Loom converts, each as two tables: config and parameters.

A family maps HF's ``config.json`` to Loom's ``ModelConfig`` and back, and says, for every Loom
parameter of one block (or of the model outside the blocks), which HF tensors make it and how
(``to_loom``), and for every HF tensor which Loom parameters make it (``to_hf``). Transforms are
numpy reshapes and transposes: PyTorch's ``nn.Linear`` stores ``[out, in]``, GPT-2's ``Conv1D``
``[in, out]``; Loom keeps ``[in, ...out]`` with heads split out (``q_kernel`` is ``[D, N, H]``).

Families: GPT-2 (``gpt2``), Llama 2/3/3.1/3.2 (``llama``, with the ``llama3`` RoPE scaling),
Mistral (``mistral``), Qwen2/2.5 (``qwen2``, q/k/v biases) and Qwen3 (``qwen3``, QK-norm), and
the mixtures of experts Mixtral (``mixtral``) and Qwen3-MoE (``qwen3_moe``): Llama's and Qwen3's
attention with a softmax router and SwiGLU experts in every layer (Loom's ``models/moe.py``).

An MoE family's config gives the experts' shape and routing (``model.moe``'s num_experts,
experts_per_token, expert_dim, norm_topk); how they are dispatched and the router losses' weights
are the run config's (``model_config_from_hf``'s ``base``), like the numerics: HF adds its
``router_aux_loss_coef`` only when ``output_router_logits`` is set, and it weighs a loss K times
Loom's (HF counts each of a token's K choices as a whole token), so the export writes
``router_aux_loss_coef = model.moe.balance_loss / K``. Expert weights are read and written one
tensor per expert (``experts.{e}.w1/w2/w3`` in Mixtral, ``experts.{e}.gate_proj/up_proj/
down_proj`` in Qwen3-MoE), the form of the Hub's checkpoints and of ``save_pretrained``; the
import also reads the fused ``experts.gate_up_proj`` / ``experts.down_proj`` that transformers
holds in memory (``save_pretrained(save_original_format=False)``). Qwen2-MoE is not converted:
its shared expert has a sigmoid gate (``shared_expert_gate``), which Loom's shared experts lack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from input_pipeline.host.command import LoomError
from models.config import ModelConfig

# (HF tensor names, the function of those tensors that gives the Loom array)
Rule = tuple[tuple[str, ...], Callable[..., np.ndarray]]
# An import table's entry: a rule, or a list of the forms a checkpoint may hold (the first whose
# tensors are all there is read; a missing tensor is named from the first form).
Rules = Rule | list[Rule]


class ConversionError(LoomError, ValueError):
  """A checkpoint cannot be converted as it is; the message names the file, key or tensor."""


@dataclasses.dataclass(frozen=True)
class Family:
  """How one HF architecture maps onto Loom's transformer."""

  model_type: str
  architecture: str  # the class transformers instantiates, for the exported config.json
  block_prefix: str  # HF names of block i start with block_prefix.format(i=i)
  config_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
  config_to_hf: Callable[[ModelConfig], dict[str, Any]]
  block_rules: Callable[[ModelConfig], dict[str, Rules]]  # Loom block leaf -> rule(s)
  top_rules: Callable[[ModelConfig], dict[str, Rules]]  # Loom leaf outside the blocks -> rule(s)
  block_export: Callable[[ModelConfig], dict[str, Rule]]  # HF tensor (in a block) -> rule
  top_export: Callable[[ModelConfig], dict[str, Rule]]
  moe: bool = False  # a mixture of experts in every layer (model.moe set)


def _get(hf: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
  if key not in hf or hf[key] is None:
    if required:
      raise ConversionError(f"config.json has no {key!r}, which the conversion needs")
    return default
  return hf[key]


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
  """RoPE base and scaling from either form of config.json (transformers 4: rope_theta and
  rope_scaling; transformers 5: rope_parameters)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  source = params if params.get("rope_type") not in (None, "default") else scaling
  # Unscaled RoPE says so: a run config's own scaling (configs/llama_8b_131k.py) must not carry
  # over to a source without one.
  out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": "none"}
  if kind == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [key for key in keys if source.get(key) is None]
    if missing:
      raise ConversionError(f"config.json's llama3 RoPE scaling has no {', '.join(missing)}")
    out.update(
      rope_scaling="llama3",
      rope_scaling_factor=float(source["factor"]),
      rope_low_freq_factor=float(source["low_freq_factor"]),
      rope_high_freq_factor=float(source["high_freq_factor"]),
      rope_original_max_len=int(source["original_max_position_embeddings"]),
    )
  elif kind != "default":
    raise ConversionError(
      f"config.json asks for RoPE scaling {kind!r}; Loom converts 'default' and 'llama3'"
    )
  return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  out: dict[str, Any] = {"rope_theta": cfg.rope_theta}
  if cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {
      "rope_type": "llama3",
      "factor": cfg.rope_scaling_factor,
      "low_freq_factor": cfg.rope_low_freq_factor,
      "high_freq_factor": cfg.rope_high_freq_factor,
      "original_max_position_embeddings": cfg.rope_original_max_len,
    }
  return out


# --- Llama, Mistral, Qwen2, Qwen3: one layout, a few switches ---


def _llama_config(qkv_bias: bool, qk_norm: bool):
  def from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
      raise ConversionError(f"config.json hidden_act={act!r}: Loom's SwiGLU uses 'silu'")
    if _get(hf, "mlp_bias", False):
      raise ConversionError("config.json mlp_bias=true: Loom's Llama-style MLP has no biases")
    if _get(hf, "attention_bias", False) and not qkv_bias:
      raise ConversionError(
        "config.json attention_bias=true: Loom has q/k/v biases (Qwen2 style) but no output bias"
      )
    window = _get(hf, "sliding_window") if _get(hf, "use_sliding_window", True) else None
    max_len = int(_get(hf, "max_position_embeddings", required=True))
    if window is not None and int(window) < max_len:
      raise ConversionError(
        f"config.json sliding_window={window} is below max_position_embeddings={max_len}: "
        "Loom's attention is full causal"
      )
    d = int(_get(hf, "hidden_size", required=True))
    heads = int(_get(hf, "num_attention_heads", required=True))
    return {
      "vocab_size": int(_get(hf, "vocab_size", required=True)),
      "d_model": d,
      "num_layers": int(_get(hf, "num_hidden_layers", required=True)),
      "num_heads": heads,
      "num_kv_heads": int(_get(hf, "num_key_value_heads", heads)),
      "head_dim": int(_get(hf, "head_dim", d // heads)),
      "mlp_dim": int(_get(hf, "intermediate_size", required=True)),
      "max_seq_len": max_len,
      "mlp": "swiglu",
      "norm": "rms",
      "norm_eps": float(_get(hf, "rms_norm_eps", 1e-6)),
      "positions": "rope",
      "qk_norm": qk_norm,
      "tie_embeddings": bool(_get(hf, "tie_word_embeddings", False)),
      "use_bias": False,
      "qkv_bias": qkv_bias or bool(_get(hf, "attention_bias", False)),
      "moe": None,
      **_rope(hf),
    }

  return from_hf


def _llama_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "intermediate_size": cfg.mlp_dim,
    "max_position_embeddings": cfg.max_seq_len,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "attention_bias": False,
    "mlp_bias": False,
    **_rope_to_hf(cfg),
  }


def _linear_in(shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
  """nn.Linear [out, in] -> Loom [in, *out split] (q/k/v kernels, MLP in-projections)."""
  return lambda w: w.T.reshape(shape)


def _llama_block_rules(qkv_bias: bool, qk_norm: bool):
  def rules(cfg: ModelConfig) -> dict[str, Rule]:
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table: dict[str, Rule] = {
      "attn_norm.scale": (("input_layernorm.weight",), lambda w: w),
      "attn.q_kernel": (("self_attn.q_proj.weight",), _linear_in((d, n, h))),
      "attn.k_kernel": (("self_attn.k_proj.weight",), _linear_in((d, k, h))),
      "attn.v_kernel": (("self_attn.v_proj.weight",), _linear_in((d, k, h))),
      "attn.out_kernel": (("self_attn.o_proj.weight",), lambda w: w.T.reshape(n, h, d)),
      "mlp_norm.scale": (("post_attention_layernorm.weight",), lambda w: w),
      "mlp.gate_kernel": (("mlp.gate_proj.weight",), lambda w: w.T),
      "mlp.up_kernel": (("mlp.up_proj.weight",), lambda w: w.T),
      "mlp.down_kernel": (("mlp.down_proj.weight",), lambda w: w.T),
    }
    if qkv_bias or cfg.qkv_bias:
      table["attn.q_bias"] = (("self_attn.q_proj.bias",), lambda b: b.reshape(n, h))
      table["attn.k_bias"] = (("self_attn.k_proj.bias",), lambda b: b.reshape(k, h))
      table["attn.v_bias"] = (("self_attn.v_proj.bias",), lambda b: b.reshape(k, h))
    if qk_norm:
      table["attn.q_norm.scale"] = (("self_attn.q_norm.weight",), lambda w: w)
      table["attn.k_norm.scale"] = (("self_attn.k_norm.weight",), lambda w: w)
    return table

  return rules


def _llama_block_export(qkv_bias: bool, qk_norm: bool):
  def rules(cfg: ModelConfig) -> dict[str, Rule]:
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    table: dict[str, Rule] = {
      "input_layernorm.weight": (("attn_norm.scale",), lambda w: w),
      "self_attn.q_proj.weight": (("attn.q_kernel",), lambda w: w.reshape(d, n * h).T),
      "self_attn.k_proj.weight": (("attn.k_kernel",), lambda w: w.reshape(d, k * h).T),
      "self_attn.v_proj.weight": (("attn.v_kernel",), lambda w: w.reshape(d, k * h).T),
      "self_attn.o_proj.weight": (("attn.out_kernel",), lambda w: w.reshape(n * h, d).T),
      "post_attention_layernorm.weight": (("mlp_norm.scale",), lambda w: w),
      "mlp.gate_proj.weight": (("mlp.gate_kernel",), lambda w: w.T),
      "mlp.up_proj.weight": (("mlp.up_kernel",), lambda w: w.T),
      "mlp.down_proj.weight": (("mlp.down_kernel",), lambda w: w.T),
    }
    if qkv_bias or cfg.qkv_bias:
      for name in ("q", "k", "v"):
        table[f"self_attn.{name}_proj.bias"] = ((f"attn.{name}_bias",), lambda b: b.reshape(-1))
    if qk_norm:
      table["self_attn.q_norm.weight"] = (("attn.q_norm.scale",), lambda w: w)
      table["self_attn.k_norm.weight"] = (("attn.k_norm.scale",), lambda w: w)
    return table

  return rules


def _llama_top_rules(cfg: ModelConfig) -> dict[str, Rule]:
  table: dict[str, Rule] = {
    "embed.table": (("model.embed_tokens.weight",), lambda w: w),
    "final_norm.scale": (("model.norm.weight",), lambda w: w),
  }
  if not cfg.tie_embeddings:
    table["unembed"] = (("lm_head.weight",), lambda w: w.T)
  return table


def _llama_top_export(cfg: ModelConfig) -> dict[str, Rule]:
  table: dict[str, Rule] = {
    "model.embed_tokens.weight": (("embed.table",), lambda w: w),
    "model.norm.weight": (("final_norm.scale",), lambda w: w),
  }
  if not cfg.tie_embeddings:
    table["lm_head.weight"] = (("unembed",), lambda w: w.T)
  return table


def _llama_like(model_type: str, architecture: str, *, qkv_bias=False, qk_norm=False) -> Family:
  def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out = _llama_config_to_hf(cfg)
    if model_type == "qwen2":
      out.pop("attention_bias"), out.pop("mlp_bias")
      out.update(use_sliding_window=False, sliding_window=None)
    if model_type == "mistral":
      out.update(sliding_window=None)
    return out

  return Family(
    model_type=model_type,
    architecture=architecture,
    block_prefix="model.layers.{i}.",
    config_from_hf=_llama_config(qkv_bias, qk_norm),
    config_to_hf=to_hf,
    block_rules=_llama_block_rules(qkv_bias, qk_norm),
    top_rules=_llama_top_rules,
    block_export=_llama_block_export(qkv_bias, qk_norm),
    top_export=_llama_top_export,
  )


# --- Mixtral, Qwen3-MoE: Llama's and Qwen3's attention, a softmax router and SwiGLU experts ---


@dataclasses.dataclass(frozen=True)
class _Experts:
  """Where an MoE family keeps its router and experts, below ``block_prefix``: the Hub's form."""

  router: str  # nn.Linear [E, D]
  expert: str  # expert e's prefix, "{e}" in it
  gate: str  # its projections, nn.Linear [out, in]: gate and up [F, D], down [D, F]
  up: str
  down: str


MIXTRAL_EXPERTS = _Experts(
  "block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", "w1.weight", "w3.weight",
  "w2.weight",
)  # fmt: skip
QWEN3_MOE_EXPERTS = _Experts(
  "mlp.gate.weight", "mlp.experts.{e}.", "gate_proj.weight", "up_proj.weight", "down_proj.weight"
)
# transformers' own form, in memory and with save_pretrained(save_original_format=False): every
# expert in one tensor, gate and up concatenated ([E, 2F, D]; down [E, D, F]).
FUSED_ROUTER, FUSED_GATE_UP, FUSED_DOWN = (
  "mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj",
)  # fmt: skip


def _moe_config(model_type: str, qk_norm: bool):
  attention = _llama_config(qkv_bias=False, qk_norm=qk_norm)

  def from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    out = attention(hf)
    if model_type == "qwen3_moe":
      # Loom's MoE models have experts in every layer; these keys put dense MLPs between them.
      dense_layers = list(_get(hf, "mlp_only_layers", []))
      if dense_layers:
        raise ConversionError(
          f"config.json mlp_only_layers={dense_layers}: those layers have a dense MLP, and "
          "Loom's MoE models have experts in every layer (mlp_only_layers must be [])"
        )
      step = _get(hf, "decoder_sparse_step", 1)
      if step != 1:
        raise ConversionError(
          f"config.json decoder_sparse_step={step}: experts in one layer of every {step}, dense "
          "MLPs in the others, and Loom's MoE models have experts in every layer "
          "(decoder_sparse_step must be 1)"
        )
      width = int(_get(hf, "moe_intermediate_size", required=True))
      norm_topk = bool(_get(hf, "norm_topk_prob", False))
    else:  # Mixtral's experts are intermediate_size wide and its top-k weights always sum to 1
      width, norm_topk = out["mlp_dim"], True
    # transformers 5 writes num_local_experts for both; Qwen3-MoE's Hub configs num_experts.
    experts = _get(hf, "num_local_experts", _get(hf, "num_experts"))
    if experts is None:
      raise ConversionError("config.json has neither 'num_local_experts' nor 'num_experts'")
    if int(experts) < 1:  # transformers builds a dense model from num_experts=0
      raise ConversionError(
        f"config.json num_experts={experts}: a mixture of experts needs at least 1; a model "
        "without experts is a dense one (convert it with the dense family's model_type)"
      )
    out["moe"] = {
      "num_experts": int(experts),
      "experts_per_token": int(_get(hf, "num_experts_per_tok", required=True)),
      "expert_dim": width,
      "shared_experts": 0,
      "first_dense": 0,  # every layer MoE (dense ones refused above)
      "router": "softmax",
      "norm_topk": norm_topk,
    }
    return out

  return from_hf


def _moe_config_to_hf(model_type: str):
  def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    out = _llama_config_to_hf(cfg)
    out.pop("mlp_bias")
    out.update(
      num_experts_per_tok=moe.experts_per_token,
      # HF's loss is K times Loom's at one weight (see the module docstring), added only when
      # output_router_logits is set (in training, by the caller).
      router_aux_loss_coef=moe.balance_loss / moe.experts_per_token,
      output_router_logits=False,
      sliding_window=None,
    )
    if model_type == "mixtral":
      out.pop("attention_bias")
      out.update(num_local_experts=moe.num_experts, intermediate_size=moe.expert_dim)
    else:
      out.update(
        num_experts=moe.num_experts,
        moe_intermediate_size=moe.expert_dim,
        norm_topk_prob=moe.norm_topk,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
      )
    return out

  return to_hf


def _expert_rules(experts: _Experts, cfg: ModelConfig) -> dict[str, Rules]:
  """Loom's router and expert kernels ([D, E]; [E, D, F] and [E, F, D]) from one tensor per
  expert, or from transformers' fused form."""
  each = lambda name: tuple(experts.expert.format(e=e) + name for e in range(cfg.moe.num_experts))
  stack = lambda *ws: np.stack([w.T for w in ws])  # E x [out, in] -> [E, in, out]
  gate_up = lambda part: lambda w: np.split(w, 2, axis=1)[part].transpose(0, 2, 1)
  return {
    "mlp.router_kernel": [((experts.router,), lambda w: w.T), ((FUSED_ROUTER,), lambda w: w.T)],
    "mlp.gate_kernel": [(each(experts.gate), stack), ((FUSED_GATE_UP,), gate_up(0))],
    "mlp.up_kernel": [(each(experts.up), stack), ((FUSED_GATE_UP,), gate_up(1))],
    "mlp.down_kernel": [
      (each(experts.down), stack),
      ((FUSED_DOWN,), lambda w: w.transpose(0, 2, 1)),
    ],
  }


def _expert_export(experts: _Experts, cfg: ModelConfig) -> dict[str, Rule]:
  """One tensor per expert; each projection's experts in a row (each kernel gathered once)."""
  table: dict[str, Rule] = {experts.router: (("mlp.router_kernel",), lambda w: w.T)}
  for name, leaf in (
    (experts.gate, "mlp.gate_kernel"),
    (experts.up, "mlp.up_kernel"),
    (experts.down, "mlp.down_kernel"),
  ):
    for e in range(cfg.moe.num_experts):
      table[experts.expert.format(e=e) + name] = ((leaf,), lambda w, e=e: w[e].T)
  return table


def _moe_like(model_type: str, architecture: str, experts: _Experts, *, qk_norm: bool) -> Family:
  """Llama's (Mixtral) or Qwen3's (Qwen3-MoE) block with the dense MLP's tensors replaced."""
  attention = _llama_block_rules(qkv_bias=False, qk_norm=qk_norm)
  attention_export = _llama_block_export(qkv_bias=False, qk_norm=qk_norm)

  def block_rules(cfg: ModelConfig) -> dict[str, Rules]:
    table = {k: v for k, v in attention(cfg).items() if not k.startswith("mlp.")}
    return {**table, **_expert_rules(experts, cfg)}

  def block_export(cfg: ModelConfig) -> dict[str, Rule]:
    table = {k: v for k, v in attention_export(cfg).items() if not k.startswith("mlp.")}
    return {**table, **_expert_export(experts, cfg)}

  return Family(
    model_type=model_type,
    architecture=architecture,
    block_prefix="model.layers.{i}.",
    config_from_hf=_moe_config(model_type, qk_norm),
    config_to_hf=_moe_config_to_hf(model_type),
    block_rules=block_rules,
    top_rules=_llama_top_rules,
    block_export=block_export,
    top_export=_llama_top_export,
    moe=True,
  )


# --- GPT-2: Conv1D [in, out] weights, fused q/k/v, learned positions, LayerNorm with biases ---


def _gpt2_config(hf: dict[str, Any]) -> dict[str, Any]:
  act = _get(hf, "activation_function", "gelu_new")
  if act not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ConversionError(
      f"config.json activation_function={act!r}: Loom's GELU is the tanh approximation ('gelu_new')"
    )
  d = int(_get(hf, "n_embd", required=True))
  return {
    "vocab_size": int(_get(hf, "vocab_size", required=True)),
    "d_model": d,
    "num_layers": int(_get(hf, "n_layer", required=True)),
    "num_heads": int(_get(hf, "n_head", required=True)),
    "num_kv_heads": int(_get(hf, "n_head")),
    "head_dim": d // int(_get(hf, "n_head")),
    "mlp_dim": int(_get(hf, "n_inner", 4 * d)),
    "max_seq_len": int(_get(hf, "n_positions", required=True)),
    "mlp": "gelu",
    "norm": "layer",
    "norm_eps": float(_get(hf, "layer_norm_epsilon", 1e-5)),
    "positions": "learned",
    "qk_norm": False,
    "tie_embeddings": bool(_get(hf, "tie_word_embeddings", True)),
    "use_bias": True,
    "qkv_bias": False,
    "moe": None,
  }


def _gpt2_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {
    "vocab_size": cfg.vocab_size,
    "n_embd": cfg.d_model,
    "n_layer": cfg.num_layers,
    "n_head": cfg.num_heads,
    "n_inner": cfg.mlp_dim,
    "n_positions": cfg.max_seq_len,
    "n_ctx": cfg.max_seq_len,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
  }


def _gpt2_block_rules(cfg: ModelConfig) -> dict[str, Rule]:
  d, n, h = cfg.d_model, cfg.num_heads, cfg.head_dim

  def qkv(part: int, bias: bool) -> Callable[[np.ndarray], np.ndarray]:
    if bias:
      return lambda b: b[part * d : (part + 1) * d].reshape(n, h)
    return lambda w: w[:, part * d : (part + 1) * d].reshape(d, n, h)

  table: dict[str, Rule] = {
    "attn_norm.scale": (("ln_1.weight",), lambda w: w),
    "attn_norm.bias": (("ln_1.bias",), lambda w: w),
    "attn.out_kernel": (("attn.c_proj.weight",), lambda w: w.reshape(n, h, d)),
    "attn.out_bias": (("attn.c_proj.bias",), lambda b: b),
    "mlp_norm.scale": (("ln_2.weight",), lambda w: w),
    "mlp_norm.bias": (("ln_2.bias",), lambda w: w),
    "mlp.up_kernel": (("mlp.c_fc.weight",), lambda w: w),
    "mlp.up_bias": (("mlp.c_fc.bias",), lambda b: b),
    "mlp.down_kernel": (("mlp.c_proj.weight",), lambda w: w),
    "mlp.down_bias": (("mlp.c_proj.bias",), lambda b: b),
  }
  for part, name in enumerate(("q", "k", "v")):
    table[f"attn.{name}_kernel"] = (("attn.c_attn.weight",), qkv(part, bias=False))
    table[f"attn.{name}_bias"] = (("attn.c_attn.bias",), qkv(part, bias=True))
  return table


def _gpt2_block_export(cfg: ModelConfig) -> dict[str, Rule]:
  d = cfg.d_model

  def fuse(q, k, v):
    return np.concatenate([x.reshape(d, -1) for x in (q, k, v)], axis=1)

  return {
    "ln_1.weight": (("attn_norm.scale",), lambda w: w),
    "ln_1.bias": (("attn_norm.bias",), lambda w: w),
    "attn.c_attn.weight": (("attn.q_kernel", "attn.k_kernel", "attn.v_kernel"), fuse),
    "attn.c_attn.bias": (
      ("attn.q_bias", "attn.k_bias", "attn.v_bias"),
      lambda q, k, v: np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)]),
    ),
    "attn.c_proj.weight": (("attn.out_kernel",), lambda w: w.reshape(-1, d)),
    "attn.c_proj.bias": (("attn.out_bias",), lambda b: b),
    "ln_2.weight": (("mlp_norm.scale",), lambda w: w),
    "ln_2.bias": (("mlp_norm.bias",), lambda w: w),
    "mlp.c_fc.weight": (("mlp.up_kernel",), lambda w: w),
    "mlp.c_fc.bias": (("mlp.up_bias",), lambda b: b),
    "mlp.c_proj.weight": (("mlp.down_kernel",), lambda w: w),
    "mlp.c_proj.bias": (("mlp.down_bias",), lambda b: b),
  }


def _gpt2_top_rules(cfg: ModelConfig) -> dict[str, Rule]:
  table: dict[str, Rule] = {
    "embed.table": (("transformer.wte.weight",), lambda w: w),
    "pos_embed.table": (("transformer.wpe.weight",), lambda w: w),
    "final_norm.scale": (("transformer.ln_f.weight",), lambda w: w),
    "final_norm.bias": (("transformer.ln_f.bias",), lambda w: w),
  }
  if not cfg.tie_embeddings:
    table["unembed"] = (("lm_head.weight",), lambda w: w.T)
  return table


def _gpt2_top_export(cfg: ModelConfig) -> dict[str, Rule]:
  table: dict[str, Rule] = {
    "transformer.wte.weight": (("embed.table",), lambda w: w),
    "transformer.wpe.weight": (("pos_embed.table",), lambda w: w),
    "transformer.ln_f.weight": (("final_norm.scale",), lambda w: w),
    "transformer.ln_f.bias": (("final_norm.bias",), lambda w: w),
  }
  if not cfg.tie_embeddings:
    table["lm_head.weight"] = (("unembed",), lambda w: w.T)
  return table


GPT2 = Family(
  model_type="gpt2",
  architecture="GPT2LMHeadModel",
  block_prefix="transformer.h.{i}.",
  config_from_hf=_gpt2_config,
  config_to_hf=_gpt2_config_to_hf,
  block_rules=_gpt2_block_rules,
  top_rules=_gpt2_top_rules,
  block_export=_gpt2_block_export,
  top_export=_gpt2_top_export,
)

FAMILIES: dict[str, Family] = {
  "gpt2": GPT2,
  "llama": _llama_like("llama", "LlamaForCausalLM"),
  "mistral": _llama_like("mistral", "MistralForCausalLM"),
  "qwen2": _llama_like("qwen2", "Qwen2ForCausalLM", qkv_bias=True),
  "qwen3": _llama_like("qwen3", "Qwen3ForCausalLM", qk_norm=True),
  "mixtral": _moe_like("mixtral", "MixtralForCausalLM", MIXTRAL_EXPERTS, qk_norm=False),
  "qwen3_moe": _moe_like("qwen3_moe", "Qwen3MoeForCausalLM", QWEN3_MOE_EXPERTS, qk_norm=True),
}


def family_of(hf_config: dict[str, Any], path: str) -> Family:
  model_type = hf_config.get("model_type")
  if model_type not in FAMILIES:
    raise ConversionError(
      f"{path}: model_type={model_type!r} is not supported; Loom converts "
      f"{', '.join(sorted(FAMILIES))}"
    )
  return FAMILIES[model_type]


def model_config_from_hf(
  hf_config: dict[str, Any], path: str, base: Mapping[str, Any]
) -> ModelConfig:
  """Loom's ModelConfig for an HF config.json: the architecture from it, every other field
  (numerics, layout, adapters; an MoE's dispatch and router-loss weights) from ``base``, a run
  config's ``model`` group."""
  family = family_of(hf_config, path)
  values = {**dict(base), **family.config_from_hf(hf_config)}
  if values["moe"] is not None:
    values["moe"] = {**dict(base["moe"] or {}), **values["moe"]}
  try:
    return ModelConfig(**values)
  except ValueError as e:
    raise ConversionError(f"{path}: {e}") from e


def hf_config_from_model(cfg: ModelConfig, family: Family, extra: dict[str, Any]) -> dict:
  """config.json for ``cfg`` in ``family``'s form (``extra``: token ids, dtype)."""
  out = {"architectures": [family.architecture], "model_type": family.model_type}
  out.update(family.config_to_hf(cfg))
  out.update(extra)
  return out
