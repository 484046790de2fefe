"""Loaded by every Python process the test suite starts (conftest.py puts this folder on
PYTHONPATH): lets every process of a test cluster write to the session's persistent compilation
cache, not only process 0.

JAX writes cache entries from process 0 alone (jax/_src/compiler.py, ``_cache_write``), expecting
the other processes of a cluster to read the same entries. On the CPU they cannot: the key hashes
the compile options and the device topology, which differ between the processes of one cluster,
so every process but 0 missed the cache and compiled every program again in every test cluster
(a warm 4-process tiny run: 61 CPU-s, 29 with this; docs/speed.md, "The test suite's time"). Here
the other processes write their own entries, under their own keys, as process 0 does; nothing
else changes, and no Loom code sees it. If JAX's private function changes, the hook steps aside
and the suite is only slower.
"""

import importlib.abc
import importlib.util
import inspect
import sys

_MODULE = "jax._src.compiler"


def _let_every_process_write(compiler) -> None:
  original = getattr(compiler, "_cache_write", None)
  if original is None:
    return
  signature = inspect.signature(original)
  expected = ["cache_key", "compile_time_secs", "module_name", "backend", "executable"]
  if list(signature.parameters)[: len(expected)] != expected:
    return

  def cache_write(*args, **kwargs):
    given = signature.bind(*args, **kwargs).arguments
    if compiler.distributed.global_state.process_id == 0 or given.get("host_callbacks"):
      return original(*args, **kwargs)  # process 0, and programs JAX never caches: JAX's way
    if given["compile_time_secs"] < compiler.config.persistent_cache_min_compile_time_secs.value:
      return None
    compiler.compilation_cache.put_executable_and_time(
      given["cache_key"],
      given["module_name"],
      given["executable"],
      given["backend"],
      int(given["compile_time_secs"]),
    )
    return None

  compiler._cache_write = cache_write


class _AfterJaxCompilerImport(importlib.abc.MetaPathFinder):
  """Patches jax._src.compiler as it is first imported: nothing is imported early here (JAX
  reads its settings from the environment at import, after each command has set them)."""

  def find_spec(self, name, path, target=None):
    if name != _MODULE:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
      return spec
    execute = spec.loader.exec_module

    def exec_module(module):
      execute(module)
      _let_every_process_write(module)

    spec.loader.exec_module = exec_module
    return spec


sys.meta_path.insert(0, _AfterJaxCompilerImport())
