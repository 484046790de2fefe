"""to_global on 8 fake CPU devices: placement, values, and the error for shapes that cannot fit;
row_blocks on TPU slices' compile-only devices (several hosts)."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import input_pipeline
from configs import default
from input_pipeline.device import row_blocks
from train.cluster import mesh as mesh_lib
from train.cluster import tpu_slice
from train.meter import hardware


@pytest.fixture(scope="module")
def sharding():
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
  mesh = Mesh(np.array(jax.devices()), ("data",))
  return NamedSharding(mesh, PartitionSpec("data", None))


def _batch(rows, seq_len=5):
  base = np.arange(rows * seq_len, dtype=np.int32).reshape(rows, seq_len)
  return {
    "inputs": base,
    "targets": base + 1,
    "positions": base % 3,
    "segment_ids": np.ones_like(base),
    "weights": np.ones(base.shape, np.float32),
  }


def test_global_batch_has_the_sharding_and_values(sharding):
  batch = _batch(16)
  out = input_pipeline.to_global(batch, sharding)
  assert out.keys() == batch.keys()
  for key, array in out.items():
    assert isinstance(array, jax.Array)
    assert array.shape == (16, 5) and array.dtype == batch[key].dtype
    assert array.sharding.is_equivalent_to(sharding, 2)
    assert len(array.addressable_shards) == 8
    for shard in array.addressable_shards:
      assert shard.data.shape == (2, 5)
      np.testing.assert_array_equal(np.asarray(shard.data), batch[key][shard.index])
    np.testing.assert_array_equal(np.asarray(array), batch[key])


def test_rows_that_do_not_divide_over_the_devices_are_named(sharding):
  with pytest.raises(ValueError) as info:
    input_pipeline.to_global(_batch(12), sharding)
  message = str(info.value)
  for part in ["batch['inputs']", "(12, 5)", "1 process", "8 devices", "cpu:0"]:
    assert part in message, (part, message)


def test_wrong_rank_is_named(sharding):
  with pytest.raises(ValueError, match=r"batch\['weights'\] of local shape \(16,\)"):
    input_pipeline.to_global({"weights": np.ones(16, np.float32)}, sharding)


def test_row_blocks_give_the_processes_of_a_stage_pair_the_same_rows():
  """On two v5e-16 slices (8 hosts of 4 chips, libtpu's compile-only descriptions): with the
  slices as two pipeline stages the rows are cut into 4 blocks (16 fsdp shards, 4 per host), and
  the host of slice 1 at each position reads the block of its peer in slice 0; with the slices as
  data replicas, 8 blocks; hosts whose shards overlap without being the same are refused, named."""
  try:
    devices = tpu_slice.compile_only_devices(hardware.parse("v5e-16", 2))
  except RuntimeError as e:
    pytest.skip(f"needs libtpu for TPU topology descriptions (.ci/run installs it): {e}")

  def blocks(**sizes):
    mesh_config = default.get_config().mesh
    mesh_config.update(sizes)
    mesh = mesh_lib.make_mesh(mesh_config, devices)
    return row_blocks(mesh_lib.batch_sharding(mesh, mesh_lib.logical_rules(mesh_config))), mesh

  (by_process, count), mesh = blocks(dcn_stage=2, fsdp=-1)
  assert count == 4 and sorted(set(by_process.values())) == [0, 1, 2, 3]
  for position in range(16):  # the same fsdp shard in both stages: one block, two hosts
    first, second = mesh.devices[0, 0, position].flat[0], mesh.devices[1, 0, position].flat[0]
    assert first.slice_index != second.slice_index
    assert by_process[first.process_index] == by_process[second.process_index]
  (by_process, count), _ = blocks(dcn_data=2, fsdp=-1)
  assert count == 8 and sorted(by_process.values()) == list(range(8))

  # Hosts whose devices sit at overlapping but unequal sets of the batch's shards.
  by_host = [[d for d in devices if d.process_index == h] for h in range(8)]
  rows = [[] for _ in range(4)]
  for host, places in enumerate([(0, 0, 1, 1), (1, 1, 2, 2), (2, 2, 3, 3), (3, 3, 0, 0)]):
    for device, row in zip(by_host[host], places, strict=True):
      rows[row].append(device)
  for host in range(4, 8):
    rows[host - 4].extend(by_host[host])
  overlapping = Mesh(np.array(rows), ("data", "fsdp"))
  with pytest.raises(ValueError, match="not equal, disjoint blocks"):
    row_blocks(NamedSharding(overlapping, PartitionSpec("data", None)))
