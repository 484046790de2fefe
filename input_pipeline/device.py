"""From this process's numpy batch to global jax.Arrays laid out by the trainer's sharding."""

import jax
import numpy as np


def to_global(
  batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
  """Assembles global [rows * process_count, seq_len] arrays from each process's rows.

  `sharding` (built by the trainer; the pipeline never names mesh axes) places the batch dimension;
  every process passes its own contiguous share, in process order, as the sampler produces it.
  """
  count = jax.process_count()
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * count, *local.shape[1:]) if local.ndim else ()
    rank = len(sharding.spec)
    try:
      if local.ndim != 2 or rank > local.ndim:
        raise ValueError(f"expected a [rows, seq_len] array for a sharding of rank {rank}")
      sharding.shard_shape(global_shape)  # raises if the batch does not divide over the devices
      out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    except ValueError as e:
      raise ValueError(
        f"batch[{key!r}] of local shape {local.shape} cannot be placed as global shape "
        f"{global_shape} ({count} process(es)) with {sharding.spec} over mesh "
        f"{dict(sharding.mesh.shape)} of {sharding.mesh.devices.size} devices "
        f"({jax.local_device_count()} local: {[str(d) for d in jax.local_devices()]}): {e}"
      ) from e
  return out
