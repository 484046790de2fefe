"""Mesh construction: single-slice and hybrid (ICI × DCN) shapes, and errors that name the fix."""

import jax
import ml_collections
import numpy as np
import pytest

from train.cluster import mesh as mesh_lib


def mesh_config(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1):
  from configs import default

  config = default.get_config().mesh
  config.update(
    dict(
      data=data,
      fsdp=fsdp,
      tensor=tensor,
      dcn_data=dcn_data,
      dcn_fsdp=dcn_fsdp,
      dcn_tensor=dcn_tensor,
    )
  )
  return config


def test_single_slice_mesh_is_unchanged():
  mesh = mesh_lib.make_mesh(mesh_config(data=2))
  assert dict(mesh.shape) == {
    "stage": 1,
    "data": 2,
    "fsdp": 4,
    "context": 1,
    "expert": 1,
    "tensor": 1,
  }
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_configs_without_dcn_keys_mean_one_slice():
  # A checkpoint's saved config or a mesh built in code may predate the dcn_* keys.
  # ... or the expert axis: no entry means size 1.
  legacy = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 2})
  assert mesh_lib.mesh_shape(legacy, 8) == {
    "stage": 1,
    "data": 1,
    "fsdp": 4,
    "context": 1,
    "expert": 1,
    "tensor": 2,
  }


def test_hybrid_shape_multiplies_ici_by_dcn():
  ici, dcn = mesh_lib.hybrid_mesh_shape(mesh_config(dcn_data=2, tensor=2), 16)
  assert ici == {"stage": 1, "data": 1, "fsdp": 4, "context": 1, "expert": 1, "tensor": 2}
  assert dcn == {"stage": 1, "data": 2, "fsdp": 1, "context": 1, "expert": 1, "tensor": 1}
  assert mesh_lib.mesh_shape(mesh_config(dcn_data=2, tensor=2), 16) == {
    "stage": 1,
    "data": 2,
    "fsdp": 4,
    "context": 1,
    "expert": 1,
    "tensor": 2,
  }


def test_emulated_slices_on_cpu_keep_each_slice_a_contiguous_block():
  # dcn_data=2: slice 0 (devices 0-3) is data row 0, slice 1 (devices 4-7) is data row 1.
  mesh = mesh_lib.make_mesh(mesh_config(dcn_data=2))
  assert dict(mesh.shape) == {
    "stage": 1,
    "data": 2,
    "fsdp": 4,
    "context": 1,
    "expert": 1,
    "tensor": 1,
  }
  ids = np.vectorize(lambda d: d.id)(mesh.devices)[0]  # the one stage
  assert ids[0].flatten().tolist() == [0, 1, 2, 3]
  assert ids[1].flatten().tolist() == [4, 5, 6, 7]
  # dcn_fsdp=2 with data=2 inside a slice: fsdp columns 0-1 are slice 0, 2-3 slice 1.
  mesh = mesh_lib.make_mesh(mesh_config(data=2, fsdp=-1, dcn_fsdp=2))
  assert dict(mesh.shape) == {
    "stage": 1,
    "data": 2,
    "fsdp": 4,
    "context": 1,
    "expert": 1,
    "tensor": 1,
  }
  ids = np.vectorize(lambda d: d.id)(mesh.devices)[0, :, :, 0]
  assert set(ids[:, :2].flatten()) == {0, 1, 2, 3}
  assert set(ids[:, 2:].flatten()) == {4, 5, 6, 7}
  rules = mesh_lib.logical_rules(mesh_config())
  assert mesh_lib.data_parallel_size(mesh, rules) == 8


@pytest.mark.parametrize(
  "config, message",
  [
    (mesh_config(dcn_data=3), "8 devices cannot form 3 slices of equal size"),
    (mesh_config(dcn_data=0), "mesh.dcn_\\* sizes must be positive integers"),
    (
      mesh_config(fsdp=2, dcn_data=2),
      "has 2 devices per slice but 4 devices per slice are available",
    ),
    (mesh_config(fsdp=3, data=-1, dcn_fsdp=2), "cannot fill mesh.data=-1: 4 devices per slice"),
    (mesh_config(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
    (mesh_config(fsdp=4), "has 4 devices but 8 devices are available"),
  ],
)
def test_shapes_that_do_not_match_the_devices_are_errors(config, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_mesh(config)


def tpu_slices(name: str, num_slices: int):
  from train.cluster import tpu_slice
  from train.meter import hardware

  try:
    return tpu_slice.compile_only_devices(hardware.parse(name, num_slices))
  except RuntimeError as e:
    pytest.skip(f"needs libtpu for TPU topology descriptions (.ci/run installs it): {e}")


def test_hybrid_mesh_over_real_tpu_slices():
  devices = tpu_slices("v5e-16", num_slices=2)  # two 4×4 slices, devices carry slice_index
  mesh = mesh_lib.make_mesh(mesh_config(dcn_data=2), devices)
  assert dict(mesh.shape) == {
    "stage": 1,
    "data": 2,
    "fsdp": 16,
    "context": 1,
    "expert": 1,
    "tensor": 1,
  }
  for row in range(2):  # every data replica is one whole slice: only DCN traffic is the gradient
    assert {d.slice_index for d in mesh.devices[0, row].flat} == {row}
  with pytest.raises(ValueError, match="the devices span 2 \\(TPU slices\\)"):
    mesh_lib.make_mesh(mesh_config(dcn_data=4), devices)


def test_one_real_slice_cannot_be_split_into_dcn_slices():
  devices = tpu_slices("v5e-16", num_slices=1)
  with pytest.raises(ValueError, match="all 16 devices are in one TPU slice"):
    mesh_lib.make_mesh(mesh_config(dcn_data=2), devices)
  assert jax.devices()[0].platform == "cpu"  # the test process itself stays on the CPU
