"""TensorFlow, imported for tf.data alone: without the Keras that its own import would load.

``import tensorflow`` ends by importing ``keras.src.optimizers`` whenever Keras is installed
(tensorflow/__init__.py: an eager load so that Keras's optimizers register themselves for
SavedModels), and tensorflow-cpu installs Keras 3. That is 1.4 s of CPU in every Loom process
(importing the trainer: 4.7 -> 3.3 CPU-s on a 2-core Xeon; docs/platform-facts.md), for a library
Loom never uses.
``load()`` imports TensorFlow with that one import failing as if Keras were absent, which
TensorFlow expects and passes over; Keras itself stays importable afterwards (``import keras``,
``tf.keras``), since nothing of it was left half-loaded.

It then freezes what the import left (``gc.freeze()``: about 350,000 objects, the modules of
TensorFlow and JAX, which live as long as the process): Python's collector no longer walks them
in each full collection, of which the imports after TensorFlow's run several. Importing the
trainer took 3.9 -> 3.0 CPU-s, a warm tiny ``python -m train`` 7.3 -> 6.3 (2-core Xeon;
``docs/platform-facts.md``). It changes what the collector visits, not what it frees: reference
counting still frees every frozen object that is dropped without a cycle.

The collector is off while TensorFlow imports, and runs once at its end, before the freeze: the
import creates about 500,000 tracked objects, and three or four full collections walked them
as they accumulated (0.55 s). The one collection at the end (0.26 s) frees what the import left
unreachable (1,686 objects, 2.1 MB), which would otherwise be frozen for good. Importing the
trainer: 3.06 -> 2.63 CPU-s, three alternated pairs (2-core Zen 5 EPYC; docs/platform-facts.md).
"""

import gc
import importlib
import importlib.abc
import importlib.machinery
import sys

# The package that TensorFlow's import loads eagerly and Loom does not need.
SKIPPED = "keras"


class _Absent(importlib.abc.Loader):
  def create_module(self, spec):
    raise ImportError(f"{SKIPPED} is not loaded while TensorFlow imports (tensorflow_import.py)")

  def exec_module(self, module):
    raise ImportError(f"{SKIPPED} is not loaded while TensorFlow imports (tensorflow_import.py)")


class _SkipWhileImporting(importlib.abc.MetaPathFinder):
  """Finds the skipped package where it is installed (TensorFlow reads its location to extend
  ``tf.keras``'s search path) and gives it a loader that refuses to run."""

  def find_spec(self, name, path, target=None):
    if name != SKIPPED:
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is not None:
      spec.loader = _Absent()
    return spec


def load():
  """Imports TensorFlow once per process, skipping Keras's load where no one has imported Keras
  yet (a notebook that has, or a process that imported TensorFlow already, is left as it is),
  and freezes the objects that import left."""
  if "tensorflow" in sys.modules or SKIPPED in sys.modules:
    return importlib.import_module("tensorflow")
  finder = _SkipWhileImporting()
  collecting = gc.isenabled()
  gc.disable()  # no full collections while TensorFlow imports: one at its end instead
  sys.meta_path.insert(0, finder)
  try:
    module = importlib.import_module("tensorflow")
  finally:
    sys.meta_path.remove(finder)
    if collecting:
      gc.enable()
  gc.collect()  # what the import left unreachable is freed, not frozen
  gc.freeze()
  return module


def as_written(fn):
  """``fn`` for tf.data to trace as written, without AutoGraph's conversion.

  Loom's tf.data functions have no Python control flow over tensors, so the conversion changes
  nothing in what they trace. It writes each converted function's source to a file in the system's
  temporary directory, removed only when the process exits cleanly: every killed run (a
  preemption's SIGKILL, an out-of-memory kill) left three there, 101 after one run of the tests.
  """
  return load().autograph.experimental.do_not_convert(fn)
