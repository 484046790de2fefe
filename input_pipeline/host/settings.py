"""The process settings Loom applies, by an explicit call from every entry point.

``apply()`` is the first thing each command does (``input_pipeline/host/command.py``), and the
library entry ``train.trainer.train_and_evaluate`` calls it too; importing a Loom module sets
nothing. It never overrides what the user set, and returns what it set.

**Object stores.** Every file goes through ``etils.epath``, which serves ``gs://`` by TensorFlow's
``tf.io.gfile`` (its default when TensorFlow is installed) or by fsspec's ``gcsfs``. Loom selects
gcsfs (``EPATH_USE_TF=false``): gfile's GCS client has its endpoint compiled in
(``https://www.googleapis.com/storage/v1/``), so it can never reach an emulator or another
GCS-compatible service, while gcsfs honours the standard ``STORAGE_EMULATOR_HOST``. Orbax writes
its arrays through TensorStore, which has settings of its own; ``STORAGE_EMULATOR_HOST`` is
translated for each library:

  TensorStore   TENSORSTORE_GCS_HTTP_URL (the endpoint) and GOOGLE_AUTH_TOKEN_FOR_TESTING (any
                token: an emulator checks none, and without it TensorStore asks the GCE metadata
                server for credentials)
  gcsfs         STORAGE_EMULATOR_HOST itself; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, because its
                bucket-type probe calls the Storage Control API, which emulators do not serve
  tf.io.gfile   cannot be pointed anywhere else (see above): Loom keeps TensorFlow's own file
                writes (TensorBoard events, TFDS's TFRecords) on local disk and copies them up

These are read when a library first touches ``gs://``: apply them before.

**XLA defaults, each one measured** (``docs/speed.md`` has the measurements). XLA reads
``XLA_FLAGS`` when the first backend starts, so they take effect only if applied before JAX's
first computation (every command applies them before it imports anything that computes).

``--xla_cpu_experimental_ynn_fusion_type=dot``: XLA:CPU (jaxlib 0.10) hands dots *and* elementwise
fusions to YNNPACK by default; on config R, YNNPACK for the dots alone and XLA's own loop fusions
for the elementwise work ran the train step 12% faster (median of five alternated pairs of
``python -m train.bench`` on a 2-core Xeon with AVX-512/AMX). Only CPU compilations read it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from input_pipeline.host.storage import EMULATOR_VARIABLE

XLA_DEFAULTS = {"xla_cpu_experimental_ynn_fusion_type": "dot"}


def object_store_variables(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
  """Sets what each storage library needs (never overriding the user's own settings); returns
  the variables it set."""
  wanted = {"EPATH_USE_TF": "false"}
  host = environ.get(EMULATOR_VARIABLE, "").strip()
  if host:
    url = host if "://" in host else f"http://{host}"
    wanted.update(
      TENSORSTORE_GCS_HTTP_URL=url,
      GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
    )
  set_now = {}
  for name, value in wanted.items():
    if name not in environ:
      environ[name] = value
      set_now[name] = value
  return set_now


def xla_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
  """Appends each default XLA flag the user has not named to ``XLA_FLAGS``; returns those added."""
  current = environ.get("XLA_FLAGS", "")
  added = [
    f"--{name}={value}" for name, value in XLA_DEFAULTS.items() if f"--{name}" not in current
  ]
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


def apply(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
  """Both of the above; returns every variable changed, with its new value."""
  changed = object_store_variables(environ)
  if xla_flags(environ):
    changed["XLA_FLAGS"] = environ["XLA_FLAGS"]
  return changed
