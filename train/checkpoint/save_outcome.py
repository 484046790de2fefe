"""What the processes of a run decide about a save, from each one's outcome (pure functions).

Each process sums up its part of a save in one line (``describe``, or one of the markers below);
the lines are exchanged through the coordination service and every process calls ``decide`` on
the same list, so all go on, retry or stop together (``manager.Checkpointer.wait``).
"""

from __future__ import annotations

import dataclasses

# Failures that the same store will give again: no point retrying them at the next save.
PERMANENT = (
  "no space left",
  "permission denied",
  "permission_denied",
  "read-only file system",
  "disk quota",
)
PEER = "peer"  # this process gave up because another process's part failed
# ... while its own part still waited on the failed one (Orbax's futures, not its barriers):
# its save threads are left behind, so Orbax cannot save again in this process.
PEER_STUCK = "peer, left waiting"
UNFINISHED = "unfinished"  # given up after a stop was asked for


def describe(error: BaseException) -> str:
  """The error in one line of at most ~400 characters, keeping what classifies it (TensorStore
  puts the OS error last, after a long spec)."""
  text = " ".join(str(error).split())
  short = text[:400]
  kept = [word for word in PERMANENT if word in text.lower() and word not in short.lower()]
  return f"{type(error).__name__}: {short}" + (f" … [{', '.join(kept)}]" if kept else "")


def permanent(cause: str) -> bool:
  return any(word in cause.lower() for word in PERMANENT)


@dataclasses.dataclass(frozen=True)
class Verdict:
  """``action``: "ok", "retry" (at the next save), "stop" or "interrupted" (a stop request
  outlasted the save). ``where``: the causes by process; ``why``: why a failure may not be
  retried ("" when it is permanent, or when retried)."""

  action: str
  where: str = ""
  why: str = ""


def decide(outcomes: list[str], *, failed_in_a_row: int, retries: int, last: bool) -> Verdict:
  """The verdict on one save from every process's outcome ("" = sealed). ``failed_in_a_row``
  counts this save if it failed; ``last``: no save follows (the end of the run, a stop)."""
  if not any(outcomes):
    return Verdict("ok")
  causes = {p: o for p, o in enumerate(outcomes) if o and o not in (PEER, PEER_STUCK)}
  where = "; ".join(f"process {p}: {cause}" for p, cause in causes.items()) or "unknown cause"
  if any(cause.startswith(UNFINISHED) for cause in causes.values()):
    return Verdict("interrupted", where)
  if any(map(permanent, causes.values())):
    return Verdict("stop", where)
  if PEER_STUCK in outcomes:
    return Verdict(
      "stop", where, "no retry: another process's save still waited on the failed part"
    )
  if last:
    return Verdict("stop", where, "the run's last save: no later one to retry it")
  if failed_in_a_row > retries:
    return Verdict("stop", where, f"{failed_in_a_row} failed saves in a row")
  return Verdict("retry", where)
