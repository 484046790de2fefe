"""Llama-3-8B-shaped model at a 131,072-token context: each row split over 2 chips (context
parallelism), Llama 3.1's long-context RoPE.

Command:  python -m train --workdir gs://BUCKET/llama8b_131k --config configs/llama_8b_131k.py \
              --config.data.source=tfds:c4/en:3.1.0 --config.data.spm_model=/path/tokenizer.model
Hardware: a TPU v5p-128 slice (64 chips): rows of 131,072 tokens split over mesh.context=2 (the
          striped layout, all-gather attention with the splash kernel per shard), FSDP over the
          other 32, 32 rows a step (4.2M tokens), full remat, the loss in chunks of 1,024.
Expected: plan it first (python -m train.plan --config configs/llama_8b_131k.py --topology
          v5p-128): compiled ahead of time, 49.9 GiB per chip of 95 (docs/long_context.md). The
          processes along the context axis read the same rows (input_pipeline.row_share), so it
          may span hosts. Not yet trained by Loom: no loss or MFU is promised.
"""

from configs import llama_8b


def get_config():
  c = llama_8b.get_config()
  c.data.seq_len = 131072
  c.model.max_seq_len = 131072
  c.model.rope_scaling = "llama3"  # Llama 3.1: RoPE stretched 8x from the 8,192 tokens trained
  c.model.rope_scaling_factor = 8.0
  c.model.rope_original_max_len = 8192
  c.mesh.context = 2  # each row's length over 2 chips of a host
  c.model.attention_context = "all_gather"
  # On TPUs the splash kernel runs per shard (models/attention.py). Where the XLA math runs
  # instead (GPUs, model.attention='xla'): each shard's 65,536 queries by blocks of 512, each
  # block's [512, 131072] scores recomputed in the backward pass (models/context_parallel.py),
  # so that the whole [65536, 131072] never exists.
  c.model.attention_block = 512
  c.train.batch_size = 32
  return c
