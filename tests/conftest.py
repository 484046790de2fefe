"""Test set-up: the CPU platform with 8 fake devices, fixed before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import pytest  # noqa: E402 (after the environment above, which must precede any JAX import)

from input_pipeline.host import settings  # noqa: E402

# The test process is an entry point like any command: Loom's process settings (object-store
# variables, XLA defaults), before JAX starts, so in-process runs compile as `python -m train` does.
settings.apply()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A data cache (prepared stores, TFDS builds) shared by one test module's training runs."""
  return str(tmp_path_factory.mktemp("cache"))
