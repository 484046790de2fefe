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
  input_pipeline.to_global(batch, sharding)     # per-process numpy batch -> global jax.Arrays

A batch is a dict of numpy arrays, each [rows, seq_len]: "inputs", "targets", "positions",
"segment_ids" (int32) and "weights" (float32, 1 where "targets" is a real next token of the same
document, 0 on padding and across document boundaries).
"""

from input_pipeline.device import to_global
from input_pipeline.errors import DataError
from input_pipeline.pipeline import Pipeline
from input_pipeline.preparation import build

__all__ = ["DataError", "Pipeline", "build", "to_global"]
