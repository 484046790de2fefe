"""Llama-3-70B-shaped model (70.6B parameters) across two TPU slices, pipeline stages over DCN.

Published shapes (meta-llama/Meta-Llama-3-70B config.json): 80 layers of width 8192, GQA 64/8
heads of 128, SwiGLU of width 28672, RoPE theta 500k, RMSNorm eps 1e-5, untied 128,256-word
vocabulary.

Command:  python -m train --workdir gs://BUCKET/llama70b --config configs/llama_70b.py \
              --config.data.source=tfds:c4/en:3.1.0 --config.data.spm_model=/path/tokenizer.model
Hardware: two TPU v5p-128 slices (2 × 64 chips) joined by the data-centre network: the 80 layers
          in two pipeline stages, one per slice (mesh.dcn_stage=2), so only one microbatch's
          activations cross the DCN per tick; inside each slice FSDP over its 64 chips. bf16
          compute, full remat, 8 microbatches of 64 rows of 8,192 tokens (bubble 1/9).
Expected: plan it (python -m train.plan --config configs/llama_70b.py --topology v5p-128
          --num_slices 2): compiled ahead of time, 81.0 GiB per chip of 95 (docs/long_context.md).
          The stages span processes: each host of one slice reads the same rows as its peer in
          the other (input_pipeline.row_share). Not trained by Loom at this size: no loss or MFU
          is promised.
"""

from configs import llama_8b


def get_config():
  c = llama_8b.get_config()
  c.model.d_model = 8192
  c.model.num_layers = 80
  c.model.num_heads = 64
  c.model.num_kv_heads = 8
  c.model.head_dim = 128
  c.model.mlp_dim = 28672
  c.train.batch_size = 512  # 8 microbatches of 64 rows: one row per fsdp shard of a slice
  c.optim.learning_rate = 1.5e-4
  c.mesh.dcn_stage = 2  # the two slices are the two stages: activations, not weights, cross DCN
  c.mesh.fsdp = -1  # each slice's chips
  c.pipeline.microbatches = 8
  return c
