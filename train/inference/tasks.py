"""The lm-eval task index, built once per process and include path.

lm-eval's ``TaskManager`` reads every task's YAML when it is made (~14,700 tasks: 7-9 s on a
2-core CPU), and a run that evaluates tasks at each eval would otherwise make one for the config
check and another at every eval. Tasks that an include path defines need none of them: their
index is that folder's alone (milliseconds), and lm-eval's own tasks are indexed only when a name
is not a task of that folder. The harness is the optional ``[eval]`` extra: nothing here imports
it until a task is asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any


class HarnessMissingError(ImportError):
  """lm-eval is not installed."""


@functools.lru_cache(maxsize=8)
def manager(include_path: str | None = None, defaults: bool = True) -> Any:
  """lm-eval's ``TaskManager`` for ``include_path`` (None: lm-eval's own tasks only), with
  lm-eval's own tasks unless ``defaults`` is False (then ``include_path``'s alone)."""
  try:
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - the optional [eval] extra
  except ImportError as e:
    raise HarnessMissingError(
      "lm-eval tasks need EleutherAI's lm-eval harness: pip install -e '.[eval]'"
    ) from e
  if not include_path:
    return TaskManager()
  return TaskManager(include_path=include_path, include_defaults=defaults)


def defined_there(tasks: Sequence[str], include_path: str) -> bool:
  """Whether every name is a task that ``include_path`` defines (not a group or tag, whose
  members may be lm-eval's own)."""
  local = manager(include_path, defaults=False)
  return all(task in local.all_subtasks for task in tasks)


def manager_for(tasks: Sequence[str], include_path: str | None = None) -> Any:
  """The index to load ``tasks`` from: ``include_path``'s alone where it defines every one of
  them (``defined_there``); else lm-eval's own with ``include_path`` on top, which takes
  precedence on a name both define."""
  if include_path and defined_there(tasks, include_path):
    return manager(include_path, defaults=False)
  return manager(include_path or None)


def unknown(tasks: Sequence[str], include_path: str | None = None) -> list[str]:
  """The names among ``tasks`` that neither lm-eval nor ``include_path`` defines."""
  known = manager_for(tasks, include_path).all_tasks
  return [task for task in tasks if task not in known]
