"""Reference benchmark config R: the shapes nanoGPT and nanodo are compared on.

Command:  python -m train.bench --config configs/bench_r.py
Hardware: the 2-core x86-64 CPU of the dev machines (fp32), or any single device.
Expected: side by side, alternated twice (docs/speed.md): on a 2-core AMD EPYC (AVX-512) Loom
          2,414 / 2,299 tokens/s, nanoGPT 2,366 / 2,456 (0.98x); on a 2-core Intel Xeon
          (AVX-512/AMX) Loom 2,045 / 2,225, nanoGPT 3,250 / 3,338 (0.63-0.67x; there XLA's
          matmuls alone, `--what matmuls`, take longer than nanoGPT's whole step). The first
          version on a Zen 3: nanoGPT 1,365, nanodo 741, Loom 742. Compare tokens/s side by side
          on one machine, never MFUs across them.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.seq_len = 256
  c.model.vocab_size = 256
  c.model.num_layers = 6
  c.model.d_model = 384
  c.model.num_heads = 6
  c.model.mlp_dim = 1536
  c.model.mlp = "gelu"
  c.model.norm = "layer"
  c.model.positions = "learned"
  c.model.tie_embeddings = True
  c.model.dtype = "float32"
  # On a CPU, unrolled layers run ~25% faster than a scan over stacked layers (the loop blocks
  # fusion across layers and copies each layer's slice of the stacked weights).
  c.model.scan_layers = False
  c.train.batch_size = 32
  c.mesh.fsdp = -1
  return c
