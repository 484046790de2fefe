"""Inference on a trained or imported model: loading, the KV-cache engine, sampling, generation,
the evaluation harness and its meter."""

import models  # noqa: F401 - first: Flax NNX without IPython where none runs (models/flax_import.py)
