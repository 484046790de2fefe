"""Loom's training library, by concern.

The run itself at the top (``trainer``, ``loop``, ``step``, ``state``, ``optimizer``, ``programs``,
``config``, ``metrics_writer``); where it runs in ``cluster/`` (mesh, jax.distributed,
preemption); ``checkpoint/`` (the Orbax manager and its integrity seal); ``inference/`` (the
KV-cache engine, sampling, loading, its meter); ``meter/`` (FLOPs, the hardware table, energy,
the run report, pod planning). The thin commands: ``python -m train``, ``train.generate``,
``train.bench``, ``train.plan``, ``train.report``, ``train.checkpoint``.

Library use: ``from train import trainer; trainer.train_and_evaluate(config, workdir)``.

Importing it changes nothing in the process: the entry points apply Loom's process settings by an
explicit call (``input_pipeline/host/settings.py``).
"""
