"""The analytic parameter count of a ModelConfig, without building the model."""

from __future__ import annotations

from models.config import ModelConfig


def param_count(cfg: ModelConfig, *, embeddings: bool = True, active: bool = False) -> int:
  """Number of parameters of ``Transformer(cfg)``.

  With ``active`` an MoE model counts what one token uses: the router, its K experts and the
  shared ones (FLOPs follow the active count; memory the total).

  With ``embeddings=False`` the token and learned-position tables are left out (the usual
  "non-embedding" count behind FLOPs/token = 6 N + attention); a tied table counts once and is
  left out entirely, while an untied unembedding [D, V] stays in, since it is a matmul.
  """
  d, f, h = cfg.d_model, cfg.mlp_dim, cfg.head_dim
  q_dim, kv_dim = cfg.num_heads * h, cfg.num_kv_heads * h
  bias = int(cfg.use_bias)
  norm = d * (1 + bias)  # scale (+ bias)
  qkv_bias = int(cfg.use_bias or cfg.qkv_bias)  # Qwen2's q/k/v biases without the others
  attention = d * (q_dim + 2 * kv_dim) + q_dim * d + qkv_bias * (q_dim + 2 * kv_dim) + bias * d
  attention += 2 * h if cfg.qk_norm else 0  # qk-norm scales, no bias
  mlp_in = 2 if cfg.mlp == "swiglu" else 1
  mlp = dense_mlp = mlp_in * (d * f + bias * f) + f * d + bias * d
  first = 0  # layers with the dense MLP before the MoE ones
  if cfg.moe is not None:
    moe, fe = cfg.moe, cfg.moe.expert_dim
    expert = mlp_in * d * fe + fe * d  # no biases
    fs = moe.shared_experts * fe
    shared = mlp_in * (d * fs + bias * fs) + fs * d + bias * d if fs else 0
    routed = moe.experts_per_token if active else moe.num_experts
    bias_e = moe.num_experts if moe.router == "sigmoid" and not active else 0
    mlp = d * moe.num_experts + bias_e + routed * expert + shared
    first = moe.first_dense
  blocks = cfg.num_layers * (2 * norm + attention) + first * dense_mlp + lora_count(cfg)
  blocks += (cfg.num_layers - first) * mlp
  total = blocks + norm  # final norm
  if not cfg.tie_embeddings:
    total += d * cfg.vocab_size
  if embeddings:
    total += cfg.vocab_size * d
    if cfg.positions == "learned":
      total += cfg.max_seq_len * d
  return total


def lora_count(cfg: ModelConfig) -> int:
  """The LoRA adapters' parameters (models/lora.py): rank × (fan-in + fan-out) of each adapted
  kernel of each layer (an MoE model adapts attention only; GELU has no gate)."""
  if cfg.lora_rank <= 0:
    return 0
  d, f = cfg.d_model, cfg.mlp_dim
  q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  sides = {"q": d + q_dim, "k": d + kv_dim, "v": d + kv_dim, "out": q_dim + d}
  if cfg.moe is None:
    sides.update(up=d + f, down=f + d, **({"gate": d + f} if cfg.mlp == "swiglu" else {}))
  adapted = sum(sides.get(target, 0) for target in cfg.lora_targets)
  return cfg.num_layers * cfg.lora_rank * adapted
