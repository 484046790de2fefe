"""Loom's training library: mesh and sharding, state, optimizer, steps, loop, checkpoints, meter.

Entry points: ``python -m train`` (train), ``python -m train.bench`` (speed). Library use:
``from train import trainer; trainer.train_and_evaluate(config, workdir)``.
"""
