"""The lm-eval task index, built once per process and include path.

lm-eval's ``TaskManager`` reads every task's YAML when it is made (~14,700 tasks: 9 s on a 2-core
CPU), and a run that evaluates tasks at each eval would otherwise make one for the config check
and another at every eval. The harness is the optional ``[eval]`` extra: nothing here imports it
until a task is asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


class HarnessMissingError(ImportError):
  """lm-eval is not installed."""


@functools.lru_cache(maxsize=8)
def manager(include_path: str | None = None) -> Any:
  """lm-eval's ``TaskManager`` for ``include_path`` (None: lm-eval's own tasks only)."""
  try:
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - the optional [eval] extra
  except ImportError as e:
    raise HarnessMissingError(
      "lm-eval tasks need EleutherAI's lm-eval harness: pip install -e '.[eval]'"
    ) from e
  return TaskManager(include_path=include_path) if include_path else TaskManager()


def unknown(tasks: Sequence[str], include_path: str | None = None) -> list[str]:
  """The names among ``tasks`` that neither lm-eval nor ``include_path`` defines."""
  known = manager(include_path or None).all_tasks
  return [task for task in tasks if task not in known]
