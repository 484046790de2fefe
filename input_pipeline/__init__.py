"""Loom's input pipeline: text -> tokenizer -> packing -> prepared store -> step-indexed batches.

The interface the trainer uses (keep it small):

  pipeline = input_pipeline.build(config)       # prepares (or reuses) the store; cheap if prepared
                                                # (once for all processes: preparation.py)
  pipeline.tokenizer                            # .encode(str) -> list[int], .decode(ids) -> str,
                                                #  .vocab_size, .eod_id
  pipeline.fingerprint                          # hex string: source + tokenizer + seq_len + format
  pipeline.manifest                             # dict describing the store (rows, efficiency, ...)
  pipeline.train_batches(global_batch_size=, start_step=, process_index=, process_count=)
      -> iterator of this process's rows of steps start_step, start_step + 1, ...
  pipeline.eval_batches(global_batch_size=, num_batches=, process_index=, process_count=)
      -> the same finite list of this process's validation batches on every call
  input_pipeline.row_share(sharding)            # (process_index, process_count) for the two above
  input_pipeline.to_global(batch, sharding)     # per-process numpy batch -> global jax.Arrays

A batch is a dict of numpy arrays, each [rows, seq_len]: "inputs", "targets", "positions",
"segment_ids" (int32) and "weights" (float32, 1 where "targets" is a real next token of the same
document, 0 on padding and across document boundaries).
"""

import importlib
import importlib.util

__all__ = ["DataError", "Pipeline", "build", "row_share", "to_global"]


def _has_tensorflow() -> bool:
  try:
    return importlib.util.find_spec("tensorflow") is not None
  except ValueError:  # sys.modules["tensorflow"] is None: imports of it are blocked
    return False


if _has_tensorflow():
  from input_pipeline import tensorflow_import

  tensorflow_import.load()  # before any module below imports TensorFlow: without Keras

  from input_pipeline.device import row_share, to_global
  from input_pipeline.errors import DataError
  from input_pipeline.pipeline import Pipeline
  from input_pipeline.preparation import build
else:
  # A host without TensorFlow (an accelerator image running ``python -m train.bench_gpu``): the
  # train step's modules import ``input_pipeline.host`` and need no data, so the exports load on
  # first use, and the ones that read data fail then, naming TensorFlow. (Loading them lazily
  # everywhere changed when TensorFlow was imported in a training process, and one of two
  # processes stopping after a failed save aborted at exit: imports stay eager where TF is.)
  _EXPORTS = {
    "DataError": "input_pipeline.errors",
    "Pipeline": "input_pipeline.pipeline",
    "build": "input_pipeline.preparation",
    "row_share": "input_pipeline.device",
    "to_global": "input_pipeline.device",
  }

  def __getattr__(name: str):
    if name not in _EXPORTS:
      raise AttributeError(f"module 'input_pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
