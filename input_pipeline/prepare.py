"""``python -m input_pipeline.prepare [--config FILE] [--config.data.KEY=VALUE ...] [--verify]``.

Takes the distributed flags of ``python -m train`` (``--coordinator_address --num_processes
--process_id``): several processes prepare one store as a run would, process 0 alone while the
others wait, or all of them tokenizing their shares with ``--config.data.parallel_prepare=True``.

Prepares a run's data store ahead of the run, once, into ``data.cache_dir`` (which may be an
object store shared by every host: ``gs://bucket/cache``). A run that finds the store opens it
and prepares nothing. ``--verify`` re-hashes every array of the store against its manifest (the
full check a run skips at start-up). Prints one JSON object last: ``store``, ``fingerprint``,
``rows`` per split, ``packing_efficiency``, ``seconds``, ``verified``. Exit 2 on a data error
(with the message), 0 otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

import configs
from train.cluster import distributed

distributed.define_flags()
_VERIFY = flags.DEFINE_bool("verify", False, "Also re-hash every array of the store (sha256).")
_CONFIG = config_flags.DEFINE_config_file(
  "config", os.path.join(os.path.dirname(configs.__file__), "default.py"), "Run config file."
)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import input_pipeline

  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  for name in ("input_pipeline", "loom"):
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
  config = _CONFIG.value
  config.data.verify_store = bool(_VERIFY.value)
  started = distributed.initialize_from_flags()
  import jax

  from train.trainer import build_data  # one process, or several as in a run

  start = time.perf_counter()
  try:
    pipeline = build_data(config)
  except input_pipeline.DataError as e:
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    distributed.end(started, 2)
    return 2
  manifest = pipeline.manifest
  result = {
    "store": os.fspath(pipeline.store.path),
    "fingerprint": pipeline.fingerprint,
    "rows": {split: stats["rows"] for split, stats in manifest["splits"].items()},
    "packing_efficiency": manifest["packing_efficiency"],
    "seconds": round(time.perf_counter() - start, 3),
    "verified": bool(_VERIFY.value),
    "processes": jax.process_count(),
  }
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  distributed.end(started, 0)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
