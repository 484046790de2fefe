"""Mixtral-8x7B-shaped mixture of experts (46.7B parameters, 12.9B active per token).

Published shapes (mistralai/Mixtral-8x7B-v0.1 config.json): 32 layers of width 4096, GQA 32/8
heads of 128, in every layer 8 SwiGLU experts of width 14336 with a softmax router choosing 2
(weights renormalised), RoPE theta 1e6, RMSNorm eps 1e-5, untied 32000-word vocabulary.
Its sliding_window is null: full causal attention, as Loom's (train.convert refuses a window
shorter than the context).

Command:  python -m train --workdir gs://BUCKET/mixtral --config configs/mixtral_8x7b.py \
              --config.data.source=tfds:c4/en:3.1.0 --config.data.spm_model=/path/tokenizer.model
Hardware: a TPU v5p-64 slice (32 chips): the experts split 8 ways (mesh.expert=8, one expert per
          chip of each group of 8), parameters, gradients and Adam state over fsdp=4 as well, bf16
          compute, full remat, 128 rows of 4,096 tokens a step in 4 micro-batches.
Expected: plan it first (python -m train.plan --config configs/mixtral_8x7b.py --topology v5p-64):
          compiled ahead of time with the dropless dispatch (the experts' all-to-all in the
          program), 68.1 GiB per chip of 95 (20.2 GiB of it the state); the compile took 51-62 s,
          the command 57-70 s (two runs) on a 2-core AMD EPYC (CPU only), 2026-12-04. Without
          micro-batches it needs 102.0 GiB: no fit; with capacity dispatch (factor 1.25) and no
          micro-batches, 56.5 GiB. On a v5p-32 (expert=8, fsdp=2, 64 rows) only capacity dispatch
          fits, at 90.5 GiB (dropless in 4 micro-batches: 118.3 GiB). docs/moe.md has the table.
          Not yet trained by Loom: no loss or MFU is promised.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.tokenizer = "sentencepiece"
  c.data.spm_vocab_size = 32000
  c.data.seq_len = 4096
  c.model.vocab_size = 32000
  c.model.scan_layers = True  # one compiled layer body: fast compiles at any depth
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 14336  # each expert's width (model.moe.expert_dim = -1)
  c.model.mlp = "swiglu"
  c.model.norm = "rms"
  c.model.norm_eps = 1e-5
  c.model.positions = "rope"
  c.model.rope_theta = 1e6
  c.model.max_seq_len = 32768  # config.json's max_position_embeddings
  c.model.tie_embeddings = False
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.mesh.expert = 8  # whole experts per chip group; tokens reach them by all-to-all
  c.mesh.fsdp = -1  # the rest of the slice: parameters, gradients and Adam state sharded
  c.model.moe.num_experts = 8
  c.model.moe.experts_per_token = 2
  c.model.moe.norm_topk = True  # Mixtral always renormalises its two weights
  # config.json's router_aux_loss_coef 0.02, in Loom's units (HF's loss is K× Loom's at balance).
  c.model.moe.balance_loss = 0.04
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 50000
  c.train.batch_size = 128
  # Four micro-batches of one row per chip (on v5p-64): the dropless exchange has room for
  # every local assignment per expert shard (8× the assignments), and a whole 4-row batch per
  # chip overflows a v5p chip (102 GiB compiled; 2 micro-batches 85.2 GiB, 4: 68.1 GiB).
  c.train.microbatches = 4
  c.train.eval_every = 2000
  c.train.eval_batches = 20
  c.checkpoint.every = 500
  c.log.every = 50
  # Whole rows for the einsum fallback; on TPUs "auto" attention is the splash kernel.
  c.model.attention_block = 0
  # Output layer and loss by 1,024 positions: fp32 [B·L, V] logits never exist whole.
  c.train.loss_chunk = 1024
  return c
