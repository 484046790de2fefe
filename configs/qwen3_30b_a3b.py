"""Qwen3-30B-A3B-shaped mixture of experts (30.5B parameters, 3.3B active per token).

Published shapes (Qwen/Qwen3-30B-A3B config.json): 48 layers of width 2048, GQA 32/4 heads of
128 (q/k RMS-normalised per head), in every layer 128 SwiGLU experts of width 768
(moe_intermediate_size) with a softmax router choosing 8, weights renormalised (norm_topk_prob),
RoPE theta 1e6, RMSNorm eps 1e-6, untied 151936-word vocabulary; no shared experts, no dense
layers (decoder_sparse_step 1, mlp_only_layers []), no sliding window.

Command:  python -m train --workdir gs://BUCKET/qwen3moe --config configs/qwen3_30b_a3b.py \
              --config.data.source=tfds:c4/en:3.1.0 --config.data.tokenizer=hf:/path/Qwen3-30B-A3B
Hardware: a TPU v5p-32 slice (16 chips): the experts split 8 ways (mesh.expert=8, 16 experts
          per chip of each group of 8), parameters, gradients and Adam state over fsdp=2 as well,
          bf16 compute, full remat, 64 rows of 4,096 tokens a step.
Expected: plan it first (python -m train.plan --config configs/qwen3_30b_a3b.py --topology v5p-32):
          compiled ahead of time with the dropless dispatch (the experts' all-to-all in the
          program), 88.6 GiB per chip of 95 (28.9 GiB of it the state); the compile took 78-88 s,
          the command 85-96 s (two runs) on a 2-core AMD EPYC (CPU only), 2026-12-04. With
          capacity dispatch (factor 1.25) 65.4 GiB; with mesh.expert=16 (fsdp=1) the dropless step
          needs 162.5 GiB; on a v5p-64 (128 rows) 68.6 GiB. On a v5p-16 (32 rows) only capacity
          dispatch with mesh.expert=4 (fsdp=2) fits, at 92.8 GiB (dropless 113.2 GiB; capacity at
          expert=8: 104.8 GiB, at expert=1: 105.0 GiB). docs/moe.md has the table. Not yet
          trained by Loom: no loss or MFU is promised.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.tokenizer = "sentencepiece"  # planning needs no files; train with the hf: tokenizer
  c.data.spm_vocab_size = 32000
  c.data.seq_len = 4096
  c.model.vocab_size = 151936
  c.model.scan_layers = True  # one compiled layer body: fast compiles at any depth
  c.model.d_model = 2048
  c.model.num_layers = 48
  c.model.num_heads = 32
  c.model.num_kv_heads = 4
  c.model.head_dim = 128
  c.model.qk_norm = True
  c.model.mlp_dim = 6144  # config.json's intermediate_size (no dense MLP layer uses it)
  c.model.mlp = "swiglu"
  c.model.norm = "rms"
  c.model.norm_eps = 1e-6
  c.model.positions = "rope"
  c.model.rope_theta = 1e6
  c.model.max_seq_len = 40960  # config.json's max_position_embeddings
  c.model.tie_embeddings = False
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.mesh.expert = 8  # whole experts per chip group; tokens reach them by all-to-all
  c.mesh.fsdp = -1  # the rest of the slice: parameters, gradients and Adam state sharded
  c.model.moe.num_experts = 128
  c.model.moe.experts_per_token = 8
  c.model.moe.expert_dim = 768  # moe_intermediate_size
  c.model.moe.norm_topk = True  # norm_topk_prob
  # config.json's router_aux_loss_coef 0.001, in Loom's units (HF's loss is K× Loom's at balance).
  c.model.moe.balance_loss = 0.008
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 50000
  c.train.batch_size = 64
  c.train.eval_every = 2000
  c.train.eval_batches = 20
  c.checkpoint.every = 500
  c.log.every = 50
  # Whole rows for the einsum fallback; on TPUs "auto" attention is the splash kernel.
  c.model.attention_block = 0
  # Output layer and loss by 1,024 positions: fp32 [B·L, 152k] logits never exist whole.
  c.train.loss_chunk = 1024
  return c
