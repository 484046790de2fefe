"""Flax NNX, imported without IPython where no IPython is running.

Flax's import asks IPython whether a shell is running (``flax/nnx/reprlib.py``: ``from IPython
import get_ipython`` to decide on coloured reprs, likewise ``nnx/summary.py`` and
``nnx/visualization.py``), and treescope registers its IPython display hooks where IPython
imports. Where IPython is not imported yet, no shell is running and the answer is "no": Flax and
treescope take an ``ImportError`` as that same answer. Importing IPython only to hear it cost
0.3 s of CPU in every Loom process (``docs/platform-facts.md``). ``load()`` imports Flax with
``import IPython`` failing for the duration; IPython itself stays importable afterwards. In a
notebook or an IPython shell (IPython already imported) Flax is imported as it is everywhere.
"""

import importlib
import sys

# What Flax's import loads only to ask it whether a shell is running.
SKIPPED = "IPython"


def load():
  """Imports Flax NNX once per process, without loading IPython where no one has imported it."""
  if "flax.nnx" in sys.modules or SKIPPED in sys.modules:
    return importlib.import_module("flax.nnx")
  sys.modules[SKIPPED] = None  # `import IPython` raises ImportError while this stands
  try:
    return importlib.import_module("flax.nnx")
  finally:
    if sys.modules.get(SKIPPED, 0) is None:
      del sys.modules[SKIPPED]
