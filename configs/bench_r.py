"""Reference benchmark config R: the shapes nanoGPT and nanodo are compared on.

Command:  python -m train.bench --config configs/bench_r.py
Hardware: the 2-core x86-64 CPU of the dev machines (fp32), or any single device.
Expected: side by side on a 2-core AMD Zen 3 (shared/NOTES.md), nanoGPT 1,365 tokens/s, nanodo
          741, Loom 742: compare tokens/s side by side on one machine, never MFUs across them.
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
