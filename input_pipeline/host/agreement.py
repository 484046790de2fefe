"""Decisions taken once and agreed by every process, with timeouts.

Shared work (preparing a data store, choosing the checkpoint to restore, quarantining one) is done
by one process and the others learn the outcome through ``jax.distributed``'s coordination
service (its key-value store and barriers), not through a device collective: no program is
compiled, nothing waits on an accelerator, and every wait has a timeout and a message naming what
it waited for (a barrier without one can hold a whole pod when one host dies). With one process
every function returns at once.
"""

from __future__ import annotations

import itertools
import logging

import jax

log = logging.getLogger("loom")

DEFAULT_TIMEOUT_S = 1800.0
_counter = itertools.count()


class AgreementTimeout(RuntimeError):
  """A process waited longer than its timeout for the others."""


def _client():
  # The coordination service client that jax.distributed started (no public accessor).
  from jax._src import distributed  # noqa: PLC0415 - private module, imported where used

  return distributed.global_state.client


def _multi() -> bool:
  return jax.process_count() > 1 and _client() is not None


def _key(name: str) -> str:
  # Every process calls these functions in the same order, so the counter names the same event.
  return f"loom/{next(_counter)}/{name}"


def barrier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Waits until every process has reached the barrier ``name``."""
  if not _multi():
    return
  key = _key(name)
  try:
    _client().wait_at_barrier(key, int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001 - the client raises XlaRuntimeError on timeouts
    raise AgreementTimeout(
      f"process {jax.process_index()} waited {timeout_s:.0f} s at barrier {name!r} for the "
      f"other processes: {e}"
    ) from e


def from_main(name: str, value: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
  """Process 0's ``value`` on every process (the others pass anything, e.g. None)."""
  if not _multi():
    return value
  key = _key(name)
  if jax.process_index() == 0:
    _client().key_value_set(key, value)
    return value
  try:
    return _client().blocking_key_value_get(key, int(timeout_s * 1000))
  except Exception as e:  # noqa: BLE001
    raise AgreementTimeout(
      f"process {jax.process_index()} waited {timeout_s:.0f} s for process 0 to decide {name!r}: "
      f"{e}"
    ) from e


def gather(name: str, value: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
  """Every process's ``value``, in process order, on every process."""
  if not _multi():
    return [value]
  key = _key(name)
  client = _client()
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  try:
    return [
      client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000))
      for p in range(jax.process_count())
    ]
  except Exception as e:  # noqa: BLE001
    raise AgreementTimeout(
      f"process {jax.process_index()} waited {timeout_s:.0f} s for the others' {name!r}: {e}"
    ) from e
