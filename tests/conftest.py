"""Test set-up: the CPU platform with 8 fake devices, fixed before JAX is imported anywhere, and
what the tests share: one persistent compilation cache for every process of the session, one data
cache, and the runs that several test files read (each started once, on first use)."""

import ctypes.util
import fcntl
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

# Every process of the session (this one, the pytest-xdist workers, every `python -m ...` they
# start, the notebooks' kernels) compiles for the CPU with LOOM_TESTS_XLA_FLAGS added to its own
# XLA_FLAGS (tests/subprocess_site/sitecustomize.py adds them in the processes started later):
# the tests check numbers and behaviour, not speed (train.bench measures that, outside the suite).
# - XLA's backend optimisation level 0: LLVM's optimisation is a third of a small compile.
# - XLA:CPU's older fusion code generators: the newer ones build MLIR rewrite patterns for every
#   fusion, most of a small program's compile at level 0 (a tiny MoE train step on 8 devices:
#   2.39 -> 0.82 s; tests/test_moe.py 78 -> 50 s). A cold tiny `python -m train` with both: 20.3
#   -> 9.6 CPU-s. For users Loom sets neither: at level 2 the older generators compiled config R
#   in 11.1 s instead of 4.0 and ran its steps 2-4% slower (docs/speed.md).
os.environ.setdefault(
  "LOOM_TESTS_XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
)
_DEVICES = "--xla_force_host_platform_device_count"
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES)]
_named = {f.split("=")[0] for f in _flags}
_flags += [f"{_DEVICES}=8"] + [
  f for f in os.environ["LOOM_TESTS_XLA_FLAGS"].split() if f.split("=")[0] not in _named
]
os.environ["XLA_FLAGS"] = " ".join(_flags)
# Every process the session starts (the pytest-xdist workers, the commands, the clusters)
# allocates through jemalloc where it is installed (Debian/Ubuntu: libjemalloc2; .ci/run installs
# it): libtpu's ahead-of-time compiles spend a fifth of their time in glibc's malloc, and the two
# largest TPU plans took 239 -> 190 CPU-s with it, the same programs and figures (2-core Xeon;
# docs/speed.md). Without it, everything runs as before, more slowly.
_JEMALLOC = ctypes.util.find_library("jemalloc")
if _JEMALLOC and not os.environ.get("LD_PRELOAD"):
  os.environ["LD_PRELOAD"] = _JEMALLOC
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Every process of the session (this one, the pytest-xdist workers, every `python -m ...` they
# start, the notebooks' kernels) shares compiled programs through one persistent cache, small
# programs included: much of a tiny run's time is compiling the same steps again. A fresh
# directory per session (nothing reused from an earlier run of the suite), made by the first
# process and inherited by the others; a size limit turns on JAX's file lock around its entries,
# which several processes write at once.
_OWN_CACHE = "LOOM_TESTS_COMPILATION_CACHE" not in os.environ
if _OWN_CACHE:
  os.environ["LOOM_TESTS_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="loom-tests-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["LOOM_TESTS_COMPILATION_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)
# Every process the session starts loads tests/subprocess_site/sitecustomize.py, which changes how
# JAX uses that cache: each process of a test cluster writes its own compiled programs (JAX writes
# only process 0's, and on the CPU the others' keys differ), and no write scans the whole cache.
_SITE = str(pathlib.Path(__file__).parent / "subprocess_site")
if _SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
  os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_SITE, os.environ.get("PYTHONPATH")]))
if not getattr(sys.modules.get("sitecustomize"), "LOOM_TESTS_SITE", False):
  # This process started before PYTHONPATH named it (pytest without workers): load it here,
  # before JAX is imported below.
  _spec = importlib.util.spec_from_file_location("loom_tests_site", f"{_SITE}/sitecustomize.py")
  _spec.loader.exec_module(importlib.util.module_from_spec(_spec))


import fork_server  # noqa: E402 (after the environment above, which must precede any JAX import)
import pytest  # noqa: E402
from cli_helpers import TINY_RUN, run_train  # noqa: E402
from cluster_helpers import DEVICES, launch  # noqa: E402

from input_pipeline.host import settings  # noqa: E402
from train.meter import flops as flops_lib  # noqa: E402

# The test process is an entry point like any command: Loom's process settings (object-store
# variables, XLA defaults), before JAX starts.
settings.apply()

# The machine's float32 matmul peak, measured once by the first process of the session (before any
# test runs, on an idle machine) and inherited by the others: each run then skips its own ~1 s
# measurement (train/meter/flops.py, LOOM_CPU_PEAK_FLOPS). test_bench.py checks the measuring path.
if flops_lib.PEAK_VARIABLE not in os.environ:
  _peak = flops_lib.run_peak("float32", use_given=False)
  os.environ[flops_lib.PEAK_VARIABLE] = repr(_peak.measured)
# The commands the tests start are forks of a server that imports with this environment
# (tests/fork_server.py), whichever test starts the first of them.
fork_server.set_base_env(os.environ)


def pytest_collection_modifyitems(config, items):
  """The slow tests first (in their files' order): with several workers the long ones start early
  and the short ones fill the gaps at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    shutil.rmtree(os.environ["LOOM_TESTS_COMPILATION_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """A data cache (prepared stores, TFDS builds) shared by the session's training runs: each store
  is prepared once. Tests that prove something about preparing data make their own."""
  return str(tmp_path_factory.mktemp("cache"))


def _shared_root(tmp_path_factory) -> pathlib.Path:
  """Where session-wide runs live: shared by every pytest-xdist worker of the session."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """``<shared root>/name``, made by ``make(path)`` the first time any worker asks for it (the
  others wait for it); a failed attempt is removed and made again by the next one who asks."""
  root = _shared_root(tmp_path_factory)
  target = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (target / ".made").exists():
      shutil.rmtree(target, ignore_errors=True)
      target.mkdir(parents=True)
      make(target)
      (target / ".made").write_text("")
  return target


def _train_into(workdir: pathlib.Path, *overrides: str, fresh: bool = False) -> None:
  # A data cache of its own: the run must not depend on which worker's cache exists.
  cache = str(workdir / "cache")
  result = run_train(str(workdir / "run"), *overrides, cache_dir=cache, fresh=fresh)
  (workdir / "stderr.txt").write_text(result.stderr)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[str, str]:
  """``python -m train --config configs/tiny.py`` as a user runs it, with a profile of steps 3-5:
  20 steps, logged every 5, evaluated and checkpointed at 10 and 20. (work directory, stderr).
  Several test files read it; a test that changes it works on a copy. A fresh interpreter, as a
  user's (the other commands of the session are forks: tests/fork_server.py)."""
  made = once(tmp_path_factory, "tiny_run", lambda path: _train_into(path, *TINY_RUN, fresh=True))
  return str(made / "run"), (made / "stderr.txt").read_text()


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> str:
  """The same run logging every step: the uninterrupted reference that resumed, killed and
  restarted runs are compared with, bit for bit. Its work directory; change only a copy."""
  made = once(tmp_path_factory, "tiny_reference", lambda p: _train_into(p, "--config.log.every=1"))
  return str(made / "run")


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory) -> tuple[str, list[str]]:
  """Two jax.distributed processes of cluster_helpers.DEVICES fake devices each, 20 steps
  (cluster_helpers.SETTINGS): (work directory, each process's output). Change only a copy."""

  def make(path: pathlib.Path) -> None:
    outputs = launch(str(path / "run"), processes=2, devices=DEVICES, cache_dir=str(path / "cache"))
    for i, output in enumerate(outputs):
      (path / f"process{i}.txt").write_text(output)

  made = once(tmp_path_factory, "two_process_run", make)
  return str(made / "run"), [(made / f"process{i}.txt").read_text() for i in (0, 1)]
