"""The inference meter: prefill/decode throughput, time to first token, FLOPs, bandwidth use and
energy of one ``Engine.run`` (the ``stats`` of ``generation.generate``).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from train.inference.engine import Generation
from train.inference.loading import Model
from train.meter import energy, flops


def measure_copy_bandwidth(
  device: jax.Device | None = None, *, megabytes: int | None = None, repeats: int = 5
) -> float:
  """Median bytes/s of an in-place elementwise update (read + write) on one device, measured now.

  The input is donated so each repetition reuses one buffer: a fresh output would measure page
  faults, not memory (1 GB/s instead of 11-15 GB/s on a 2-core CPU). The array is larger than any
  cache: 256 MiB on CPUs, 1 GiB on accelerators.
  """
  device = device or jax.local_devices()[0]
  megabytes = megabytes or (256 if device.platform == "cpu" else 1024)
  x = jax.device_put(jnp.zeros((megabytes * (1 << 20) // 4,), jnp.float32), device)
  nbytes = x.nbytes
  update = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  x = update(x).block_until_ready()  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    x = update(x).block_until_ready()
    times.append(time.perf_counter() - start)
  del x
  return 2 * nbytes / statistics.median(times)


@functools.cache
def copy_bandwidth(device: jax.Device) -> float:
  """``measure_copy_bandwidth`` of ``device``, once per process: each generation's meter divides
  by it, and measuring it again every time (0.4 s on a 2-core CPU) would be paid by every
  generation of a notebook, an eval sample or a test."""
  return measure_copy_bandwidth(device)


def inference_stats(
  model: Model,
  out: Generation,
  *,
  prompt_tokens: int,
  measured_joules: float | None,
  measured_by: str,
  measure_bandwidth: bool,
) -> dict[str, Any]:
  """Prefill/decode throughput, time to first token, FLOPs, bandwidth use and energy per 1k."""
  cfg, meter = model.model_cfg, model.config.meter
  generated = sum(map(len, out.tokens))
  devices = list(model.mesh.devices.flat)
  step_time = out.decode_seconds / max(out.decode_steps - 1, 1)
  bandwidth = None
  if measure_bandwidth:
    bandwidth = copy_bandwidth(jax.local_devices()[0])
    if devices[0].platform != "cpu":
      bandwidth *= len(devices)  # fake CPU devices share one machine's memory: count it once
  seconds = out.time_to_first_token_s + out.decode_seconds
  power = energy.energy_figures(
    seconds=seconds,
    devices=devices,
    pue=meter.pue,
    grid_kg_per_kwh=meter.grid_kg_per_kwh,
    power_override=meter.power_watts,
    measured_joules=measured_joules,
    measured_by=measured_by,
  )
  per_1k = power["energy_kwh"] * 1000 / generated if generated else None
  return {
    "step": model.step,
    "prompt_tokens": prompt_tokens,
    "generated_tokens": generated,
    "compile_time_s": out.compile_seconds,
    "prefill_tokens_per_second": out.prefill_tokens / max(out.time_to_first_token_s, 1e-9),
    "time_to_first_token_s": out.time_to_first_token_s,
    # The tokens taken with the first came within the time to the first token, not after.
    "decode_tokens_per_second": (
      out.decode_tokens / out.decode_seconds if out.decode_seconds else None
    ),
    "decode_step_time_s": step_time,
    "flops_per_generated_token": flops.forward_flops_per_token(cfg, round(out.mean_context)),
    "bytes_per_decode_step": out.bytes_per_decode_step,
    "copy_bandwidth_bytes_per_second": bandwidth,
    "bandwidth_utilisation": (
      out.bytes_per_decode_step / step_time / bandwidth if bandwidth else None
    ),
    "energy_kwh": power["energy_kwh"],
    "energy_kwh_per_1k_tokens": per_1k,
    "co2e_kg": power["co2e_kg"],
    "energy_source": power["energy_source"],
    "assumptions": {
      "prefill": "prompt tokens up to the first generated token (shortest prompt × rows) / time "
      "to first token; longer prompts' remaining tokens run as decode steps",
      "flops": f"2*(N_nonembedding_active + d_model*vocab if tied) + 4*layers*heads*head_dim*"
      f"context at the mean context {out.mean_context:.0f} (train/meter/flops.py "
      "forward_flops_per_token)",
      "bandwidth": "(all weights + the whole KV cache) read per decode step / median step time, "
      "against a jitted elementwise copy measured in this process",
      "energy_method": power["energy_method"],
      "pue": meter.pue,
      "grid_kg_co2e_per_kwh": meter.grid_kg_per_kwh,
    },
  }
