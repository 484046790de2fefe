"""GPT-2 small's shape (12 × 768): the architecture of OpenAI's GPT-2 on SentencePiece tokens, 111M
parameters with this 32k vocabulary (124M with GPT-2's own 50,257).

Command:  python -m train --workdir gs://BUCKET/gpt2 --config configs/gpt2_small.py \
              --config.data.source=tfds:c4/en:3.1.0
Hardware: one TPU host (v6e-8 as it is; v5e-8 with train.microbatches=4, v4-8 with 8, by the
          analytic plan) or one or more A100/H100 GPUs (bf16 compute, fp32 params); it also
          compiles and steps on a CPU, slowly.
Expected: not yet trained to the end by Loom: no loss or MFU is promised here. Measured once, the
          step alone on one H200 in bf16 (32 × 1024 tokens): 160k tokens/s, MFU ~0.13 of the
          datasheet peak (docs/speed.md).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.tokenizer = "sentencepiece"
  c.data.spm_vocab_size = 32000
  c.data.seq_len = 1024
  c.model.vocab_size = 32768  # the tokenizer's 32000, padded to a multiple of 128 for the MXU
  c.model.scan_layers = True  # one compiled layer body: fast compiles at any depth
  c.model.d_model = 768
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.mlp = "gelu"
  c.model.norm = "layer"
  c.model.norm_eps = 1e-5
  c.model.positions = "learned"
  c.model.tie_embeddings = True
  c.model.use_bias = True
  c.model.dtype = "bfloat16"
  c.optim.learning_rate = 6e-4
  c.optim.warmup_steps = 2000
  c.optim.min_lr_ratio = 0.1
  c.train.steps = 10000
  c.train.batch_size = 256
  c.train.eval_every = 1000
  c.train.eval_batches = 50
  c.checkpoint.every = 1000
  c.log.every = 50
  # Whole rows: blocks of queries are a CPU-measured win; accelerators await fused kernels.
  c.model.attention_block = 0
  return c
