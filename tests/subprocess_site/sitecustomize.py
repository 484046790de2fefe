"""Loaded by every Python process the test suite starts (conftest.py puts this folder on
PYTHONPATH, and loads this file itself where its own process started without it): the session's
compile flags, and two changes to how JAX uses the session's persistent compilation cache;
nothing else, and no Loom code sees them. If JAX's private functions change, each hook steps
aside and the suite is only slower.

- The flags of ``LOOM_TESTS_XLA_FLAGS`` (conftest.py says which and why) added to this process's
  own ``XLA_FLAGS``, which the test that started it chose (device count, ...), before anything
  reads them: every process of the session compiles for the CPU as the test processes do.

- Every process of a test cluster writes its compiled programs, not only process 0. JAX writes
  cache entries from process 0 alone (jax/_src/compiler.py, ``_cache_write``), expecting the
  other processes of a cluster to read the same entries. On the CPU they cannot: the key hashes
  the compile options and the device topology, which differ between the processes of one
  cluster, so every process but 0 compiled every program again in every test cluster (a warm
  4-process tiny run: 61 CPU-s, 29 with this). Here the others write their own entries, under
  their own keys, as process 0 does.
- No eviction scan before each write (``_no_eviction``).

docs/platform-facts.md has both facts; docs/speed.md, "The test suite's time", the effect.
"""

import importlib.abc
import importlib.util
import inspect
import os
import sys

LOOM_TESTS_SITE = True  # conftest.py loads this file itself where the process started without it


def _add_session_flags(environ=os.environ) -> None:
  current = environ.get("XLA_FLAGS", "").split()
  names = {flag.split("=")[0] for flag in current}
  wanted = environ.get("LOOM_TESTS_XLA_FLAGS", "").split()
  added = [flag for flag in wanted if flag.split("=")[0] not in names]
  if added:
    environ["XLA_FLAGS"] = " ".join(current + added)


_add_session_flags()


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


def _no_eviction(lru_cache) -> None:
  """The session's cache is a fresh temporary directory, far below its size limit (conftest.py
  sets one only to get JAX's file lock around entries that several processes write at once).
  JAX evicts before every write by reading every entry's size and access time (through
  etils.epath where it is installed): 56 ms a write at 2000 entries, and a session writes
  thousands of entries. Nothing is ever evicted here, so nothing is scanned."""
  cache = getattr(lru_cache, "LRUCache", None)
  if cache is not None and hasattr(cache, "_evict_if_needed"):
    cache._evict_if_needed = lambda self, *, additional_size=0: None


_PATCHES = {"jax._src.compiler": _let_every_process_write, "jax._src.lru_cache": _no_eviction}


class _AfterJaxImports(importlib.abc.MetaPathFinder):
  """Patches the modules of _PATCHES as each is first imported: nothing is imported early here
  (JAX reads its settings from the environment at import, after each command has set them)."""

  def find_spec(self, name, path, target=None):
    patch = _PATCHES.get(name)
    if patch is None:
      return None
    finder = self
    sys.meta_path.remove(finder)
    try:
      spec = importlib.util.find_spec(name)
    finally:
      sys.meta_path.insert(0, finder)
    if spec is None or spec.loader is None:
      return spec
    execute = spec.loader.exec_module

    def exec_module(module):
      execute(module)
      patch(module)

    spec.loader.exec_module = exec_module
    return spec


for _name, _patch in _PATCHES.items():  # already imported (a process loading this file late)
  if _name in sys.modules:
    _patch(sys.modules[_name])
sys.meta_path.insert(0, _AfterJaxImports())
