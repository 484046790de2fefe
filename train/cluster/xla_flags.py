"""XLA flags Loom sets by default, each one measured, each one the user's to override.

``--xla_cpu_experimental_ynn_fusion_type=dot``: XLA:CPU (jaxlib 0.10) hands dots *and* elementwise
fusions to YNNPACK by default; on config R, YNNPACK for the dots alone and XLA's own loop fusions
for the elementwise work run the train step 12% faster (median of five alternated pairs of
``python -m train.bench``, 1,397 against 1,247 tokens/s on a 2-core Xeon with AVX-512/AMX; every
pair in favour). Only CPU compilations read it.

A flag the user already put in ``XLA_FLAGS`` is left as it is. XLA reads ``XLA_FLAGS`` when the
first backend starts, so this runs on import of ``train``, before any computation.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot"}


def configure(environ: MutableMapping[str, str] = os.environ) -> list[str]:
  """Appends each default flag the user has not set to ``XLA_FLAGS``; returns those added."""
  current = environ.get("XLA_FLAGS", "")
  added = [f"--{name}={value}" for name, value in DEFAULTS.items() if f"--{name}" not in current]
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
