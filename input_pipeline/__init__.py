"""Loom's input pipeline: text -> tokenizer -> packing -> prepared store -> step-indexed batches.

The interface the trainer uses (keep it small; Loom's own modules import each name from its module,
``preparation.build``, ``device.to_global``, ..., and the package exports them for everyone else):

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

__all__ = ["DataError", "Pipeline", "build", "row_share", "to_global"]

# The exports load on first use: importing the package (or ``input_pipeline.host``, the layer
# every command stands on) imports no TensorFlow, so the commands that read no data
# (``train.report``, ``train.checkpoint``, ``train.plan``, ``train.convert``) start without it
# (2.4 s of CPU a process on a 2-core Xeon; docs/platform-facts.md), as does a host without TF
# (an accelerator image running ``python -m train.bench_gpu``), where reading data fails naming
# it. The modules that read data import TensorFlow at their own import, through
# ``tensorflow_import`` (without Keras); Loom's modules import those modules, not these exports, so
# a training process has TensorFlow from its start: loaded during a run instead, it made one of two
# processes stopping after a failed save abort at exit.
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
