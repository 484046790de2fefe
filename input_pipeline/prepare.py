"""``python -m input_pipeline.prepare [--config FILE] [--config.data.KEY=VALUE ...] [--verify]``.

Takes the distributed flags of ``python -m train`` (``--coordinator_address --num_processes
--process_id``): several processes prepare one store as a run would, process 0 alone while the
others wait, or all of them tokenizing their shares with ``--config.data.parallel_prepare=True``.

Prepares a run's data store ahead of the run, once, into ``data.cache_dir`` (which may be an
object store shared by every host: ``gs://bucket/cache``). A run that finds the store opens it
and prepares nothing. ``--verify`` re-hashes every array of the store against its manifest (the
full check a run skips at start-up; ``--config.data.verify_store=True`` is the same). Prints one
JSON object last: ``store``, ``fingerprint``, ``rows`` per split, ``packing_efficiency``,
``seconds``, ``verified``; for a mixture (one store per source) ``store``, ``rows`` and
``packing_efficiency`` are lists in the order of ``sources``, and ``fingerprint`` is the
mixture's. Exit 2 on a data error (with the message), 0 otherwise.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import flags

from input_pipeline import preparation
from input_pipeline.host import command

_VERIFY = flags.DEFINE_bool("verify", False, "Also re-hash every array of the store (sha256).")

USAGE = "usage: python -m input_pipeline.prepare [--config FILE] [--config.data.KEY=VALUE ...]"


def main(argv: list[str]) -> int:
  config = command.config()
  verify = bool(_VERIFY.value) or bool(config.data.verify_store)
  config.data.verify_store = verify
  start = time.perf_counter()
  pipeline = preparation.build(config)  # one process, or several as in a run
  mixture = getattr(pipeline, "mixture", None)
  stores = mixture.stores if mixture is not None else [pipeline.store]
  result = {
    "store": [os.fspath(store.path) for store in stores],
    "fingerprint": pipeline.fingerprint,
    "rows": [
      {split: stats["rows"] for split, stats in store.manifest["splits"].items()}
      for store in stores
    ],
    "packing_efficiency": [store.manifest["packing_efficiency"] for store in stores],
  }
  if mixture is None:
    result = {key: value[0] if key != "fingerprint" else value for key, value in result.items()}
  else:
    result["sources"] = list(mixture.specs)
  result.update(
    seconds=round(time.perf_counter() - start, 3),
    verified=verify,
    processes=jax.process_count(),
  )
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return command.EXIT_OK


if __name__ == "__main__":
  # Every process says what it prepared (its share of the documents, with parallel_prepare).
  command.run(main, usage=USAGE, config_default="default.py", every_process_logs=True)
