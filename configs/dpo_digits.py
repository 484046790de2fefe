"""DPO from scratch on a checkable toy task: answer a prompt of three digits with its first.

Command:  python -m train.rl.digits_dpo --workdir /tmp/dpo_digits   (writes the pairs, then runs)
Hardware: any laptop CPU (2 cores suffice).
Expected: rewards/accuracies rises to ~1 and the held-out greedy answers become the preferred
ones (docs/huggingface.md has a run's numbers).

The pairs of train/rl/digits_dpo.py: the chosen completion is the prompt's first digit, the
rejected one another digit. A randomly initialised byte-level model; the reference is its
starting weights (a frozen copy in the train state).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.train.objective = "dpo"
  c.data.seq_len = 32  # two pairs of 6-byte documents ("123>1" and its end) per row
  c.data.validation_percent = 10  # one batch of pairs (the held-out prompts are apart)
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 5
  c.optim.schedule = "constant"
  c.train.steps = 60
  c.train.batch_size = 32
  c.train.eval_every = 0
  c.log.every = 1
  c.log.tensorboard = False
  c.log.sample_tokens = 0
  c.checkpoint.every = 10
  c.checkpoint.max_to_keep = 10  # every checkpoint's greedy answers are scored
  c.dpo.beta = 0.5  # 0.1 learned the pairs as well, the held-out answers half as well
  return c
