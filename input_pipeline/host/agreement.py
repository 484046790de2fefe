"""Decisions taken once and agreed by every process, with timeouts.

Shared work (preparing a data store, choosing the checkpoint to restore, quarantining one) is done
by one process and the others learn the outcome through ``jax.distributed``'s coordination
service (its key-value store and barriers), not through a device collective: no program is
compiled, nothing waits on an accelerator, and every wait has a timeout and a message naming what
it waited for (a barrier without one can hold a whole pod when one host dies). With one process
every function returns at once.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable

import jax

log = logging.getLogger("loom")

DEFAULT_TIMEOUT_S = 1800.0
_counter = itertools.count()


class AgreementTimeout(RuntimeError):
  """A process waited longer than its timeout for the others."""


class BarrierAborted(RuntimeError):
  """A watched barrier gave up before every process arrived (``abort`` gave a reason)."""


def _client():
  # The coordination service client that jax.distributed started (no public accessor).
  from jax._src import distributed  # noqa: PLC0415 - private module, imported where used

  return distributed.global_state.client


def coordinator_host() -> str:
  """The host part of the coordination service's address (127.0.0.1 without a cluster)."""
  from jax._src import distributed  # noqa: PLC0415 - private module, imported where used

  address = distributed.global_state.coordinator_address or "127.0.0.1:0"
  return address.rsplit(":", 1)[0].strip("[]")


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


_barrier_calls: collections.Counter = collections.Counter()
_barrier_lock = threading.Lock()


def watched_barrier(
  name: str, timeout_s: float, abort: Callable[[], str | None], poll_s: float = 0.1
) -> None:
  """A barrier that any thread may wait at, which gives up as soon as ``abort()`` names a reason.

  The coordination service's own barriers wait for everyone or for their timeout; a process
  that will never arrive (its part of a save failed) holds the rest that long. Here each process
  writes a key and polls for the others', asking ``abort`` between polls. The n-th call of a
  ``name`` on one process meets the n-th call of it on the others (names may repeat).
  """
  if not _multi():
    return
  with _barrier_lock:
    n = _barrier_calls[name]
    _barrier_calls[name] += 1
  prefix = f"loom/barrier/{name}/{n}/"
  client = _client()
  client.key_value_set(f"{prefix}{jax.process_index()}", "here")
  deadline = time.monotonic() + timeout_s
  while len(client.key_value_dir_get(prefix)) < jax.process_count():
    reason = abort()
    if reason:
      raise BarrierAborted(f"gave up waiting at barrier {name!r}: {reason}")
    if time.monotonic() > deadline:
      raise AgreementTimeout(
        f"process {jax.process_index()} waited {timeout_s:.0f} s at barrier {name!r} for the "
        f"other processes"
      )
    time.sleep(poll_s)


def publish(key: str, value: str) -> None:
  """Writes ``loom/<key>`` for every process to see (no waiting); one writer per key."""
  if _multi():
    _client().key_value_set(f"loom/{key}", value)


def published(directory: str) -> dict[str, str]:
  """The keys written under ``loom/<directory>/`` so far (by any process), without waiting."""
  if not _multi():
    return {}
  prefix = f"loom/{directory}/"
  return {key[len(prefix) :]: value for key, value in _client().key_value_dir_get(prefix)}


def leave(timeout_s: float = 5.0) -> None:
  """Says that this process is leaving; process 0, whose process hosts the coordination service,
  waits (at most ``timeout_s``) until every other process has said so. Without this a process
  still tearing down when process 0 exits loses the service and aborts (exit -6) instead of ending
  with its own exit code. Never raises: the process is on its way out."""
  if not _multi():
    return
  try:
    client = _client()
    client.key_value_set(f"loom/leaving/{jax.process_index()}", "")
    if jax.process_index() != 0:
      return
    deadline = time.monotonic() + timeout_s
    while len(client.key_value_dir_get("loom/leaving/")) < jax.process_count():
      if time.monotonic() > deadline:
        return  # a process that never comes (hung, crashed): its heartbeats end it
      time.sleep(0.05)
  except Exception:  # noqa: BLE001 - the service may be gone already
    return


def preemption_noticed() -> bool:
  """Whether any process of the cluster has received a preemption notice (SIGTERM) so far.

  JAX's preemption notifier owns SIGTERM under ``jax.distributed`` and announces a notice to
  every process through this key of the coordination service (docs/platform-facts.md); the
  synchronised stop step comes later, from ``reached_preemption_sync_point``.
  """
  if not _multi():
    return False
  try:
    _client().key_value_try_get("RECEIVED_PREEMPTION_NOTICE")
  except Exception:  # noqa: BLE001 - NOT_FOUND: no notice yet
    return False
  return True
