"""The default model as a mixture of experts: 8 SwiGLU experts of half the MLP's width, top-2.

Command:  python -m train --workdir /tmp/loom-moe --config configs/moe_small.py
Hardware: any laptop CPU (2 cores suffice), like configs/default.py.
Expected: ~6 minutes on a 2-core AMD EPYC, CPU only (measured 350 s for the command, 326 s of it
          training at a median 3,169 tokens/s, 2026-12-04, idle machine); final eval loss 1.629
          nats/token, against the dense default's 1.579 in the same sitting. 2.7-4.9% of the
          assignments dropped per layer at the last step (capacity dispatch on a CPU).

Same active matmul FLOPs per token as the default dense model: each token goes through K = 2 of
E = 8 experts of width F = 512, so K·F = 1,024 = the default model.mlp_dim, and the experts a
token uses hold 3·D·K·F = 786,432 weights per layer, as the dense SwiGLU MLP does. The router
adds D·E = 256 × 8 = 2,048 weights per layer, 8,192 in all: 4,270,848 matmul weights per token
against the dense model's 4,262,656, so 28,770,816 training FLOPs per token against 28,721,664
(+0.17%; tests/test_moe_configs.py checks it). All experts together hold 4× the dense MLP's
weights: 13.7M parameters, 4.3M active.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.moe.num_experts = 8
  c.model.moe.experts_per_token = 2
  c.model.moe.expert_dim = c.model.mlp_dim // 2  # K·F = mlp_dim: the dense model's active FLOPs
  # On CPUs capacity dispatch (fixed [E, C, D] slots, C = 1.25 × K·tokens / E, the overflow
  # dropped and counted in moe/dropped/layer_<i>): XLA:CPU's grouped matmul made a dropless step
  # 7x slower here (9.6 s against 1.3 s, train.bench, 2-core EPYC). Dropless on GPUs and TPUs.
  c.model.moe.dispatch = "auto"
  return c
