"""``build(config)``: the data of a run, prepared once however many processes the run has.

Process 0 prepares the store (or finds it) while the others wait, then they open what it prepared
(with a shared ``data.cache_dir`` they prepare nothing); a failure on process 0 is reported to
every process. With one process this is ``pipeline.build_local``.

``data.parallel_prepare`` (several processes, one text source): process 0 first resolves the
source and the tokenizer (a TFDS build, a SentencePiece model), then every process tokenizes its
share of the documents into the shared cache, then process 0 packs them into the store (byte
for byte the one it would prepare alone: ``input_pipeline/shares.py``).

The processes agree through ``jax.distributed``'s coordination service, with timeouts
(``input_pipeline/host/agreement.py``); every process must call ``build`` in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import jax
import ml_collections

from input_pipeline import pipeline, shares
from input_pipeline.errors import DataError
from input_pipeline.host import agreement

log = logging.getLogger("loom")

T = TypeVar("T")


def build(config: ml_collections.ConfigDict) -> pipeline.Pipeline:
  """The run's prepared data on this process, prepared once for all of them."""
  timeout = float(config.data.prepare_timeout_s)
  if not (config.data.parallel_prepare and jax.process_count() > 1):
    return _first_on_main("data-prepared", lambda: pipeline.build_local(config), timeout)
  shares.check_supported(config.data)
  process, count = jax.process_index(), jax.process_count()
  resolved = _first_on_main("data-resolved", lambda: pipeline.source_and_tokenizer(config), timeout)
  error: BaseException | None = None
  try:
    counts = pipeline.tokenize_share(config, resolved, process, count)
    outcome = "ok"
    done = ", ".join(f"{split} {n} documents" for split, n in counts.items())
    log.info("tokenized this process's share: %s", done or "none needed (store ready)")
  except Exception as e:  # noqa: BLE001 - every process learns of it below, then it is raised
    outcome, error = f"{type(e).__name__}: {e}", e
  outcomes = agreement.gather("data-shares", outcome, timeout)
  for index, other in enumerate(outcomes):
    if other != "ok":
      if index == process and error is not None:
        raise error
      raise DataError(f"process {index} could not tokenize its share: {other}")
  return _first_on_main(
    "data-prepared",
    lambda: pipeline.build_local(config, shares=count, resolved=resolved),
    timeout,
  )


def _first_on_main(name: str, make: Callable[[], T], timeout: float) -> T:
  """``make()`` on process 0 first; the others wait for its outcome, then run ``make()``."""
  if jax.process_index() == 0:
    try:
      result = make()
    except Exception as e:
      agreement.from_main(name, f"{type(e).__name__}: {e}", timeout)
      raise
    agreement.from_main(name, "ok", timeout)
    return result
  log.info("waiting up to %.0f s for process 0 (%s)", timeout, name)
  outcome = agreement.from_main(name, None, timeout)
  if outcome != "ok":
    raise DataError(f"process 0 could not prepare the data: {outcome}")
  return make()
