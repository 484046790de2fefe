"""FLOP accounting, and the peak that MFU is quoted against (one definition everywhere).

FLOPs per token of training (forward + backward, the PaLM / Chinchilla convention):

    6 · (N_nonembedding + d_model · V if tied)  +  12 · num_layers · num_heads · head_dim · seq_len

- 6·N: each weight does one multiply-add (2 FLOPs) per token forward and two backward. N leaves
  out the embedding tables and holds an untied output layer; an MoE model's N is what one token
  uses (the router, its K experts, the shared ones). With LoRA the frozen weights take 4 (no
  weight gradient) and the adapters 6.
- d_model · V: a tied output projection is a real matmul, though the embedding it shares, a
  lookup, is not (an untied one is in N already); position-embedding lookups are free.
- 12·L·(N·H)·T: attention scores (QKᵀ) and the weighted sum (AV), 2·T·N·H FLOPs each forward,
  ×3 for forward + backward, counted over the full T×T square (no causal discount), as PaLM does.

Norms, activations, softmax and the optimizer are left out: they are memory-bound and small.
Inference (forward only) is a third of this: 2·(…) + 4·L·N·H·T_context per generated token.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp

import models
from input_pipeline.host.command import LoomError
from models.config import ModelConfig
from train.meter import hardware


def matmul_params(cfg: ModelConfig) -> int:
  """Weights that take part in a matmul per token: non-embedding params plus the output layer
  (of an MoE model, the active ones: the router and the experts a token goes to). The
  non-embedding count holds an untied output layer already (``models/param_count.py``); a tied
  one, left out of it with the embedding, is added here."""
  output = cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0
  return models.param_count(cfg, embeddings=False, active=True) + output


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Forward attention-score and value FLOPs per token at context ``seq_len``."""
  return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """6 FLOPs per weight; with LoRA the frozen weights take no weight gradient: 4 for them (the
  forward and the input's gradient), 6 for the adapters."""
  adapters = models.lora_count(cfg)
  frozen = matmul_params(cfg) - adapters if adapters else 0
  return 6 * matmul_params(cfg) - 2 * frozen + 3 * attention_flops_per_token(cfg, seq_len)


def forward_flops_per_token(cfg: ModelConfig, context: int) -> int:
  return 2 * matmul_params(cfg) + attention_flops_per_token(cfg, context)


def measure_matmul_peak(
  device: jax.Device | None = None, *, size: int = 2048, dtype=jnp.float32, repeats: int = 10
) -> float:
  """Median FLOP/s of a square matmul on one device, measured now, in this process."""
  device = device or jax.local_devices()[0]
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
  b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Peak:
  """The peak FLOP/s of the devices one process's steps run on, and where the figure comes from.

  MFU divides by ``flops_per_second``: the datasheet dense peak of the compute dtype on TPUs and
  GPUs (``train/meter/hardware.py``); on CPUs, which have no datasheet figure, a matmul measured
  in this process. ``measured`` is that matmul's reading either way, reported beside it.
  """

  flops_per_second: float
  source: str
  measured: float


# A CPU's float32 matmul peak in FLOP/s, measured earlier on the same machine (the
# ``peak_flops_per_second`` of a float32 run's report.json, or ``measure_matmul_peak``; the test
# suite measures it once at its start): a float32 run that finds it skips the ~1 s it would spend
# measuring, most of a small command's start-up when several start at once on a few cores. Runs of
# other compute dtypes always measure; so does the benchmark, unless told ``--peak=given``.
PEAK_VARIABLE = "LOOM_CPU_PEAK_FLOPS"


class PeakError(LoomError, ValueError):
  """A given peak that is not a positive number of FLOP/s."""


def given_cpu_peak(environ=os.environ) -> float | None:
  """``LOOM_CPU_PEAK_FLOPS`` as FLOP/s, or None where it is unset; an error names a bad value."""
  text = environ.get(PEAK_VARIABLE, "").strip()
  if not text:
    return None
  try:
    value = float(text)
  except ValueError:
    value = float("nan")
  if not value > 0 or value == float("inf"):
    raise PeakError(
      f"{PEAK_VARIABLE}={text!r}: must be a positive number of FLOP/s (a measured matmul peak, "
      "e.g. 2.9e11), or unset to measure it"
    )
  return value


def run_peak(dtype: str, *, repeats: int = 5, use_given: bool = True) -> Peak:
  """The peak for MFU of this process's devices at compute ``dtype``. On a CPU at float32, the
  peak given in ``LOOM_CPU_PEAK_FLOPS`` where ``use_given`` and it is set; otherwise measured."""
  devices = jax.devices()
  cpu_float32 = devices[0].platform == "cpu" and jnp.dtype(dtype) == jnp.float32
  given = given_cpu_peak() if use_given and cpu_float32 else None
  if given is not None:
    # Fake CPU devices share their machine's cores: count each process's machine once, as below.
    total = given * jax.process_count()
    return Peak(total, f"given ({PEAK_VARIABLE}, a matmul measured earlier on this machine)", total)
  # The better of two medians: a shared or throttling machine reads low now and then.
  measured = max(measure_matmul_peak(dtype=jnp.dtype(dtype), repeats=repeats) for _ in range(2))
  if devices[0].platform == "cpu":
    # Fake CPU devices share their machine's cores: count each process's machine once. (Several
    # processes on one machine, as in the tests, then over-count the peak and under-state MFU.)
    total = measured * jax.process_count()
    return Peak(total, f"measured ({dtype} 2048² matmul, best of two medians, per machine)", total)
  per_device = hardware.datasheet_peak(devices[0], dtype)
  count = len(devices)
  if per_device is None:
    source = f"measured ({dtype} 2048² matmul; no datasheet entry for {devices[0].device_kind!r})"
    return Peak(measured * count, source, measured * count)
  kind = hardware.lookup(devices[0].device_kind).name
  return Peak(per_device * count, f"datasheet ({kind}, {dtype}, dense) × {count}", measured * count)
