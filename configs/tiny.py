"""Tiny config for tests: a two-layer model on a few standard-library files; seconds per run.

Command:  python -m train --workdir /tmp/tiny --config configs/tiny.py
Hardware: any CPU (the tests run it on 8 fake CPU devices).
Expected: a few seconds after compilation; loss falls from ~5.6 within 20 steps.
"""

import os
import sysconfig

from configs import default


def get_config():
  c = default.get_config()
  c.data.source = "files:" + os.path.join(sysconfig.get_paths()["stdlib"], "email", "*.py")
  c.data.validation_percent = 20
  c.data.seq_len = 32
  c.model.scan_layers = True  # one compiled layer body: fast compiles at any depth
  c.model.d_model = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 64
  c.optim.learning_rate = 1e-2
  c.optim.warmup_steps = 2
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.eval_every = 10
  c.train.eval_batches = 2
  c.checkpoint.every = 10
  c.log.every = 5
  c.log.tensorboard = False
  c.log.sample_tokens = 8
  return c
