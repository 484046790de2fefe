"""Loom's training library, by concern.

The run itself at the top (``trainer``, ``loop``, ``step``, ``state``, ``optimizer``, ``programs``,
``config``, ``metrics_writer``); where it runs in ``cluster/`` (mesh, jax.distributed,
preemption); ``checkpoint/`` (the Orbax manager and its integrity seal); ``inference/`` (the
KV-cache engine, sampling, loading, its meter); ``meter/`` (FLOPs, the hardware table, energy,
the run report, pod planning). The thin commands: ``python -m train``, ``train.generate``,
``train.bench``, ``train.plan``, ``train.report``, ``train.checkpoint``.

Library use: ``from train import trainer; trainer.train_and_evaluate(config, workdir)``.
"""

from train import storage as _storage
from train.cluster import xla_flags as _xla_flags

# Object-store settings (gcsfs for gs://, an emulator from STORAGE_EMULATOR_HOST) must be in the
# environment before gcsfs is imported or TensorStore opens a gs:// path: every command imports
# this package first.
_storage.configure_object_store()
# Measured XLA defaults (train/cluster/xla_flags.py), before any backend starts.
_xla_flags.configure()
