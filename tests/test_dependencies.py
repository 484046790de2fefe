"""The house rules of the import graph: dependencies point down, and imports do nothing.

``models/`` imports no other package of Loom; ``input_pipeline/`` imports ``models/`` at most;
``input_pipeline/host/`` (what both the data and the training packages stand on) imports neither;
``train/`` sits on top. No module reaches into another's private names, first-party imports sit
at module level, and importing any module of Loom leaves the process's environment as it was
(the entry points apply Loom's settings by an explicit call).
"""

import ast
import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("train", "models", "input_pipeline", "configs")


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      parts = path.relative_to(REPO).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      found[name] = path
  return found


MODULES = _modules()


def _imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
  """(imported module or name, line, inside a function) for every import of a file."""
  found = []

  def visit(node: ast.AST, in_function: bool) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import):
        found.extend((alias.name, child.lineno, in_function) for alias in child.names)
      elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
        found.extend((f"{child.module}.{a.name}", child.lineno, in_function) for a in child.names)
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      visit(child, nested)

  visit(ast.parse(path.read_text()), False)
  return found


def _first_party(name: str) -> bool:
  return name.split(".")[0] in PACKAGES


def _is_command(path: pathlib.Path) -> bool:
  return 'if __name__ == "__main__":' in path.read_text()


def _climbing(modules: dict[str, pathlib.Path]) -> list[str]:
  """Imports that point up or sideways, one line each."""
  wrong = []
  for module, path in modules.items():
    targets = {name for name, _, _ in _imports(path) if _first_party(name)}
    top = module.split(".")[0]
    for target in targets:
      package = target.split(".")[0]
      if top == "models" and package != "models":
        wrong.append(f"{module} imports {target}: models/ imports no other package of Loom")
      if top == "input_pipeline" and package == "train":
        wrong.append(f"{module} imports {target}: input_pipeline/ never imports train/")
      in_leaf = target.startswith("input_pipeline.host") or package == "configs"
      if module.startswith("input_pipeline.host") and not in_leaf:
        wrong.append(f"{module} imports {target}: input_pipeline/host/ is the leaf below both")
      if top == "configs" and package != "configs":
        wrong.append(f"{module} imports {target}: config files import only other configs")
  return sorted(wrong)


# The data package's exports for users, loaded on first use (input_pipeline/__init__.py): Loom's
# modules import each from its own module, so a command that reads data has TensorFlow from its
# import on, never from the middle of a run.
_LAZY_EXPORTS = {"input_pipeline", "input_pipeline.build", "input_pipeline.Pipeline"}
_LAZY_EXPORTS |= {
  "input_pipeline.DataError",
  "input_pipeline.row_share",
  "input_pipeline.to_global",
}


def _reaching_in(modules: dict[str, pathlib.Path]) -> list[str]:
  """First-party imports inside functions, uses of another module's private names, and of the
  data package's lazy exports."""
  wrong = []
  for module, path in modules.items():
    tree = ast.parse(path.read_text())
    imported_modules = {}  # local name -> first-party module
    for name, line, in_function in _imports(path):
      if not _first_party(name):
        continue
      if in_function:
        wrong.append(f"{module}:{line} imports {name} inside a function")
      if name in _LAZY_EXPORTS:
        wrong.append(f"{module}:{line} imports {name}, a lazy export: import its own module")
      last = name.rsplit(".", 1)[-1]
      if last.startswith("_") and not last.startswith("__"):
        wrong.append(f"{module}:{line} imports the private {name}")
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and _first_party(node.module):
        for alias in node.names:
          imported_modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if _first_party(alias.name):
            imported_modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in imported_modules
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and imported_modules[node.value.id] in MODULES
      ):
        target = imported_modules[node.value.id]
        wrong.append(f"{module}:{node.lineno} uses {target}.{node.attr}")
  return sorted(wrong)


def test_dependencies_point_down():
  assert not _climbing(MODULES), "\n".join(_climbing(MODULES))


def test_no_module_reaches_into_another_or_imports_loom_inside_functions():
  assert not _reaching_in(MODULES), "\n".join(_reaching_in(MODULES))


def test_the_checks_find_what_they_look_for(tmp_path):
  (tmp_path / "data.py").write_text("from train import storage\n")
  (tmp_path / "layers.py").write_text("import input_pipeline\n")
  (tmp_path / "leaf.py").write_text("from input_pipeline import pipeline\n")
  (tmp_path / "user.py").write_text(
    "from train.inference import generation\n"
    "import input_pipeline\n"
    "def f():\n  from train import trainer\n  return generation._eval_engine\n"
  )
  fake = {
    "input_pipeline.data": tmp_path / "data.py",
    "models.layers": tmp_path / "layers.py",
    "input_pipeline.host.leaf": tmp_path / "leaf.py",
    "train.user": tmp_path / "user.py",
  }
  climbing = _climbing(fake)
  assert any(line.startswith("input_pipeline.data imports train.storage") for line in climbing)
  assert any(line.startswith("models.layers imports input_pipeline") for line in climbing)
  assert any(line.startswith("input_pipeline.host.leaf imports") for line in climbing)
  reaching = _reaching_in(fake)
  assert any("imports train.trainer inside a function" in line for line in reaching)
  assert any("uses train.inference.generation._eval_engine" in line for line in reaching)
  assert any("imports input_pipeline, a lazy export" in line for line in reaching)


# A repository path in the project's code, docs, configs and notebooks: docs/data.md,
# train/checkpoint/manager.py, ... (placeholders such as configs/X.py have an upper-case stem).
_CITED = re.compile(
  r"(?<![\w/.])((?:docs|train|models|input_pipeline|configs|tests|notebooks|\.ci)/"
  r"[\w./-]*\w\.(?:md|py|png|ipynb|toml))\b"
)


def test_every_file_the_project_cites_is_in_the_repository():
  """Comments and guides cite files of the repository only, and those files exist (a module
  that moved left its old path in three comments)."""
  cited = []
  texts = [*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("notebooks/*.ipynb")]
  texts += [REPO / "pyproject.toml", REPO / ".ci" / "run"]
  for path in [*MODULES.values(), *texts]:
    for match in _CITED.finditer(path.read_text()):
      ref = match.group(1)
      if not pathlib.Path(ref).stem.isupper() and not (REPO / ref).exists():
        cited.append(f"{path.relative_to(REPO)} cites {ref}, which does not exist")
  assert not cited, "\n".join(sorted(set(cited)))


@pytest.mark.slow
def test_importing_any_module_changes_nothing_in_the_environment():
  """Every library module (commands aside: their job is to apply the settings), imported after
  the third-party packages they import (whose own import-time settings are theirs), leaves
  ``os.environ`` exactly as it was."""
  libraries = sorted(m for m, path in MODULES.items() if not _is_command(path))
  third_party = sorted(
    {
      name.split(".")[0]
      for path in MODULES.values()
      for name, _, in_function in _imports(path)
      if not in_function and not _first_party(name) and name.split(".")[0] != "__future__"
    }
    # What the data modules import through input_pipeline/tensorflow_import.py (without Keras).
    | {"tensorflow"}
  )
  code = f"""
import importlib, json, os
for name in {third_party!r}:
  importlib.import_module(name)
before = dict(os.environ)
for name in {libraries!r}:
  importlib.import_module(name)
after = dict(os.environ)
print(json.dumps({{k: [before.get(k), after.get(k)] for k in set(before) | set(after)
                  if before.get(k) != after.get(k)}}))
"""
  env = {k: v for k, v in os.environ.items() if k not in ("EPATH_USE_TF",)}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  changed = json.loads(result.stdout.strip().splitlines()[-1])
  assert changed == {}, f"importing Loom's modules changed the environment: {changed}"
  assert len(libraries) > 60  # the walk found the modules


def test_tensorflow_and_flax_import_without_what_loom_never_uses():
  """TensorFlow's import loads Keras wherever Keras is installed (1.2 s of CPU in every process),
  Flax NNX's loads IPython only to ask whether a shell is running (0.3 s): the commands that read
  no data import no TensorFlow at all (2.4 s); the data modules import it without Keras (and
  freeze what that import left, 0.9 s of collections later, collecting once at its end instead of
  four times during it, 0.45 s), and every command that reads data
  has it from its import on (input_pipeline/__init__.py says why; no module of Loom uses the lazy
  exports that would load it later: test_no_module_reaches_into_another_or_imports_loom_inside_
  functions); the model package imports Flax
  without IPython; tf.data, Keras, ``tf.keras``, NNX and IPython all work afterwards."""
  code = """
import gc
import importlib
import sys
during_tensorflow = []  # the full collections while TensorFlow imports, before the freeze
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2
                    and "tensorflow" in sys.modules and not gc.get_freeze_count()
                    and during_tensorflow.append(1))
for name in ["input_pipeline", "train.report", "train.compare", "train.checkpoint.__main__",
             "train.plan", "models"]:
  importlib.import_module(name)
  assert "tensorflow" not in sys.modules, name
import train.__main__  # a command that reads data: TensorFlow from its import on
assert "tensorflow" in sys.modules
# What TensorFlow's import left is frozen: later full collections walk only what came after.
assert gc.get_freeze_count() > 100_000 and gc.get_freeze_count() > len(gc.get_objects())
# None while it imports (three to four, 0.55 CPU-s), one at its end: no garbage is frozen.
assert len(during_tensorflow) == 1, during_tensorflow
import models
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "IPython"))
assert "tensorflow" in sys.modules and "flax.nnx" in sys.modules and not loaded, loaded[:5]
import tensorflow as tf
assert [int(x) for x in tf.data.Dataset.range(3).map(lambda x: x * 2)] == [0, 2, 4]
import keras
assert tf.keras.optimizers.Adam is keras.optimizers.Adam
from flax import nnx
assert nnx.Linear(2, 3, rngs=nnx.Rngs(0)).kernel.value.shape == (2, 3)
import IPython
assert IPython.get_ipython() is None
print("ok")
"""
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_installed_libraries_are_the_declared_versions():
  """Every library pyproject.toml declares (the project's and the test extra's) is installed at a
  version it allows: a stale environment (ml_dtypes 0.7.0, whose import costs every command
  0.45 CPU-s; pyproject.toml says why) fails here, naming the library, not as a slower suite."""
  tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  declared = [
    Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]
  ]
  wrong = {}
  for requirement in declared:
    if requirement.marker is not None and not requirement.marker.evaluate():
      continue
    installed = importlib.metadata.version(requirement.name)
    if not requirement.specifier.contains(installed, prereleases=True):
      wrong[requirement.name] = f"{installed} installed, {requirement.specifier} declared"
  assert len(declared) > 20 and not wrong, wrong


def test_the_compilation_cache_is_written_with_zstd():
  """JAX compresses each entry of its persistent compilation cache with zstd where it can import
  it (Python 3.14's compression.zstd, or the zstandard package pyproject.toml requires before),
  otherwise with zlib, seven times slower. A program compiled here (this session's cache,
  conftest.py) is written as a zstd frame."""
  import uuid

  import jax
  import jax.numpy as jnp

  directory = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  salt = float(uuid.uuid4().int % 1_000_003)  # a program no other test compiled: a new entry

  def loom_cache_probe(x):
    return x * salt + 1.0

  jax.jit(loom_cache_probe)(jnp.ones(4)).block_until_ready()
  entries = sorted(directory.glob("jit_loom_cache_probe-*-cache"))
  assert entries, sorted(p.name for p in directory.iterdir())[:20]
  zstd_frame = b"\x28\xb5\x2f\xfd"
  assert {entry.read_bytes()[:4] for entry in entries} == {zstd_frame}
