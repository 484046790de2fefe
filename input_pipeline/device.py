"""From this process's numpy batch to global jax.Arrays laid out by the trainer's sharding."""

import functools
import math

import jax
import numpy as np


# Cached: to_global asks at every step, and a pod's mesh has thousands of devices.
@functools.lru_cache(maxsize=64)
def row_blocks(sharding: jax.sharding.NamedSharding) -> tuple[dict[int, int], int]:
  """Each process's block of a global batch's rows: ``({process: its block}, number of blocks)``.

  A process's block is the set of rows its devices hold (not always contiguous: a TPU host's
  chips sit where the torus puts them along the batch; ``jax.make_array_from_process_local_data``
  takes a process's rows in row order). Usually one block per process; where a mesh axis that
  does not split the rows spans processes (pipeline stages across slices), the processes along it
  hold the same block and must read the same rows. Blocks are numbered by their first row.
  ValueError where the processes' blocks overlap without being equal, or differ in size."""
  mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
  # One row (and one position) per shard: the blocks' layout at any batch size.
  shape = tuple(
    math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ())) for e in spec[:2]
  )
  rows_of: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map(shape).items():
    rows_of.setdefault(device.process_index, set()).update(range(*index[0].indices(shape[0])))
  blocks = sorted({tuple(sorted(rows)) for rows in rows_of.values()})
  covered = sorted(row for block in blocks for row in block)
  if covered != list(range(shape[0])) or len({len(block) for block in blocks}) != 1:
    raise ValueError(
      f"the processes' rows of a batch sharded {sharding.spec} over mesh {dict(mesh.shape)} are "
      f"not equal, disjoint blocks (rows per process, one row per shard: "
      f"{ {p: sorted(r) for p, r in sorted(rows_of.items())} }); each process must hold the "
      f"same number of the batch's shards, and two processes all of the same ones or none"
    )
  return {p: blocks.index(tuple(sorted(r))) for p, r in rows_of.items()}, len(blocks)


def row_share(sharding: jax.sharding.NamedSharding) -> tuple[int, int]:
  """``(index, count)``: this process reads block ``index`` of ``count`` (``row_blocks``), as the
  pipeline's ``process_index`` and ``process_count`` take it."""
  if jax.process_count() == 1:
    return 0, 1
  blocks, count = row_blocks(sharding)
  return blocks[jax.process_index()], count


def to_global(
  batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding
) -> dict[str, jax.Array]:
  """Assembles global [rows * blocks, seq_len] arrays from each process's rows.

  `sharding` (built by the trainer; the pipeline never names mesh axes) places the batch dimension;
  every process passes the rows of its block (``row_share``), as the sampler produces them.
  """
  count = row_share(sharding)[1]
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
        f"{global_shape} ({jax.process_count()} process(es), {count} row block(s)) with "
        f"{sharding.spec} over mesh {dict(sharding.mesh.shape)} of {sharding.mesh.devices.size} "
        f"devices ({jax.local_device_count()} local: {[str(d) for d in jax.local_devices()]}): {e}"
      ) from e
  return out
