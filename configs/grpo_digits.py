"""GRPO from scratch on a verifiable toy task: answer a prompt of three digits with its first.

Command:  python -m train.rl.digits --workdir /tmp/digits   (writes the prompt files, then runs)
Hardware: any laptop CPU (2 cores suffice).
Expected: see docs/huggingface.md ("GRPO"): the held-out exact-match reward rises from ~0 to > 0.5.

A randomly initialised byte-level model, one new token per completion. Two rewards: the format
(a digit: each record's "format" field) at weight 0.2 shapes the first steps, and exact match
against the record's "answer" then carries the learning.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.train.objective = "grpo"
  c.data.seq_len = 8  # a 4-byte prompt and its answer
  c.model.d_model = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  c.model.scan_layers = True
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 5
  c.optim.schedule = "constant"
  c.train.steps = 300
  c.train.batch_size = 128  # 16 prompts × 8 completions
  c.train.eval_every = 20
  c.checkpoint.every = 100
  c.log.tensorboard = False
  c.rl.rewards = ("train.rl.rewards:exact_match", "train.rl.rewards:format_match")
  c.rl.reward_weights = (1.0, 0.2)
  c.rl.group_size = 8
  c.rl.max_new_tokens = 1
  c.rl.eval_limit = 0  # all held-out prompts
  c.rl.kl_coef = 0.01
  return c
