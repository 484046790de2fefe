"""Reference benchmark config R: the shapes nanoGPT and nanodo are compared on.

Command:  python -m train.bench --config configs/bench_r.py
Hardware: the 2-core x86-64 CPU of the dev machines (fp32), or any single device.
Expected: on that CPU nanoGPT (PyTorch) reaches ~40% MFU and nanodo (JAX/Linen) ~34% against
          the measured XLA matmul peak; Loom should reach at least that (README, "Speed").
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
