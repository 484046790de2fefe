"""to_global on 8 fake CPU devices: placement, values, and the error for shapes that cannot fit."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import input_pipeline


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
