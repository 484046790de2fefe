"""Llama-3-8B-shaped model (8.0B parameters): RMSNorm, RoPE (theta 500k), SwiGLU, GQA 32/8, untied.

Command:  python -m train --workdir gs://BUCKET/llama8b --config configs/llama_8b.py \
              --config.data.source=tfds:c4/en:3.1.0 --config.data.spm_model=/path/tokenizer.model
Hardware: a TPU v5p-128 or v5e-256 pod slice (multi-host, FSDP over all chips, full remat), or
          4+ nodes of 8 × H100 under Slurm.
Expected: plan it first (python -m train.plan --config configs/llama_8b.py --topology v5p-128):
          compiled ahead of time for v5p-128 with splash attention and the chunked loss it needs
          23.6 GiB per chip of 95 (with model.attention=xla it does not compile: the [L, L]
          scores overflow the TPU's scoped VMEM). Not yet trained by Loom: no loss or MFU is
          promised.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.tokenizer = "sentencepiece"
  c.data.spm_vocab_size = 32000
  c.data.seq_len = 8192
  c.model.vocab_size = 128256
  c.model.scan_layers = True  # one compiled layer body: fast compiles at any depth
  c.model.d_model = 4096
  c.model.num_layers = 32
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 14336
  c.model.mlp = "swiglu"
  c.model.norm = "rms"
  c.model.norm_eps = 1e-5
  c.model.positions = "rope"
  c.model.rope_theta = 500000.0
  c.model.tie_embeddings = False
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 50000
  c.train.batch_size = 256
  c.train.eval_every = 2000
  c.train.eval_batches = 20
  c.checkpoint.every = 500
  c.log.every = 50
  # Whole rows for the einsum fallback; on TPUs "auto" attention is the splash kernel.
  c.model.attention_block = 0
  # Output layer and loss by 1,024 positions: fp32 [B·L, 128k] logits never exist whole (on
  # v5p-128 the compiled step needs 17.1 GB less per chip: 23.8 GB of temporaries, not 40.9).
  c.train.loss_chunk = 1024
  return c
