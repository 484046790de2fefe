"""Llama-3.2-1B-shaped model (1.24B parameters with a 128k vocabulary): RMSNorm, RoPE, SwiGLU, GQA.

Command:  python -m train --workdir gs://BUCKET/llama1b --config configs/llama_1b.py \
              --config.data.source=tfds:c4/en:3.1.0 --config.data.spm_model=/path/tokenizer.model
Hardware: 8 × H100 or a TPU v5p-8 with train.microbatches=8, a v5e-16 with 16 (FSDP over all
          chips, bf16 compute; in one microbatch none of them holds the activations).
Expected: plan it first (python -m train.plan --config configs/llama_1b.py --topology v5p-128:
          30.5 GiB per chip of 95, compiled ahead of time). Not yet trained by Loom: no loss or
          MFU is promised here.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.tokenizer = "sentencepiece"
  c.data.spm_vocab_size = 32000
  c.data.seq_len = 2048
  c.model.vocab_size = 128256
  c.model.scan_layers = True  # one compiled layer body: fast compiles at any depth
  c.model.d_model = 2048
  c.model.num_layers = 16
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.head_dim = 64
  c.model.mlp_dim = 8192
  c.model.mlp = "swiglu"
  c.model.norm = "rms"
  c.model.norm_eps = 1e-5
  c.model.positions = "rope"
  c.model.rope_theta = 500000.0
  c.model.tie_embeddings = True
  c.model.dtype = "bfloat16"
  c.model.remat = "save_dots"
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 20000
  c.train.batch_size = 512
  c.train.eval_every = 1000
  c.train.eval_batches = 20
  c.checkpoint.every = 500
  c.log.every = 50
  # Whole rows: blocks of queries are a CPU-measured win; accelerators await fused kernels.
  c.model.attention_block = 0
  return c
