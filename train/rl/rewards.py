"""Reward functions for GRPO, and loading the ones a config names.

A reward function is ``(prompts, completions, **fields) -> list[float]``: one number per
completion. ``fields`` are the prompt records' other fields (``answer``, ...), each a list
aligned with ``completions`` (TRL's ``GRPOTrainer`` convention), so a function takes what it
needs and ignores the rest with ``**_``. ``rl.rewards`` names them ``"package.module:function"``;
``rl.reward_weights`` weighs them into the total that the advantages are computed from.

Two ship here: ``exact_match`` (the completion's answer equals the record's ``answer`` field) and
``format_match`` (the completion matches a regular expression).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import traceback
from collections.abc import Callable, Sequence

from input_pipeline.host.command import LoomError

# R1's format: reasoning then the answer in tags; a record's "format" field may give another.
ANSWER_FORMAT = r"^.*<answer>.*?</answer>\s*$"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

RewardFn = Callable[..., list[float]]


def extract_answer(completion: str) -> str:
  """The text of the last ``<answer>...</answer>`` if there is one, else the first line."""
  tagged = _ANSWER_TAG.findall(completion)
  text = tagged[-1] if tagged else completion.split("\n", 1)[0]
  return text.strip()


def exact_match(
  prompts: list[str], completions: list[str], answer: list | None = None, **_
) -> list[float]:
  """1 where the completion's answer (``extract_answer``) equals the record's ``answer``."""
  del prompts
  if answer is None or any(a is None for a in answer):  # records without the field
    raise ValueError("a prompt record has no 'answer' field; exact_match needs one in each")
  return [
    float(extract_answer(c) == str(a).strip()) for c, a in zip(completions, answer, strict=True)
  ]


def format_match(prompts: list[str], completions: list[str], **fields) -> list[float]:
  """1 where the whole completion matches the record's ``format`` regular expression (default
  ``ANSWER_FORMAT``), dots matching newlines."""
  del prompts
  patterns = fields.get("format") or [ANSWER_FORMAT] * len(completions)
  return [
    float(re.fullmatch(p or ANSWER_FORMAT, c, re.DOTALL) is not None)
    for p, c in zip(patterns, completions, strict=True)
  ]


@dataclasses.dataclass(frozen=True)
class Rewards:
  """The config's reward functions, their names and weights."""

  names: tuple[str, ...]
  functions: tuple[RewardFn, ...]
  weights: tuple[float, ...]

  def score(
    self, prompts: list[str], completions: list[str], fields: dict[str, list]
  ) -> dict[str, list[float]]:
    """Each function's rewards, checked: one finite number per completion."""
    scores = {}
    for name, fn in zip(self.names, self.functions, strict=True):
      try:
        values = fn(prompts, completions, **fields)
      except Exception as e:  # noqa: BLE001 - a user's function: named in one line, with where
        raise RewardError(f"rl.rewards: {name} raised {_raised(e)}") from e
      if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(type(values))
        raise RewardError(
          f"rl.rewards: {name} returned {got} for {len(completions)} completions; it must "
          "return a list of one float per completion"
        )
      try:
        values = [float(v) for v in values]
      except (TypeError, ValueError) as e:
        raise RewardError(f"rl.rewards: {name} returned a value that is not a number ({e})") from e
      if not all(math.isfinite(v) for v in values):
        raise RewardError(f"rl.rewards: {name} returned a value that is not finite: {values}")
      scores[name] = values
    return scores

  def total(self, scores: dict[str, list[float]]) -> list[float]:
    columns = [scores[name] for name in self.names]
    return [
      sum(w * v for w, v in zip(self.weights, row, strict=True))
      for row in zip(*columns, strict=True)
    ]


def _raised(error: Exception) -> str:
  """``Type: message (at file:line)``, the line being the innermost frame of the traceback."""
  frames = traceback.extract_tb(error.__traceback__)
  where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
  return f"{type(error).__name__}: {error}{where}"


def metric_names(names: Sequence[str]) -> list[str]:
  """The metric name of each reward function: its function name, or where two functions share
  one, its whole name with the module's dots and the colon as dots."""
  short = [str(name).rpartition(":")[2] for name in names]
  return [
    s if short.count(s) == 1 else str(name).replace(":", ".")
    for s, name in zip(short, names, strict=True)
  ]


class RewardError(LoomError, ValueError):
  """A reward function cannot be loaded, or returned something other than one float each."""


def load(names: Sequence[str], weights: Sequence[float]) -> Rewards:
  """Imports ``rl.rewards`` and pairs them with ``rl.reward_weights`` (() = 1 each)."""
  names, weights = tuple(names), tuple(weights)
  if not names:
    raise RewardError("rl.rewards=() names no reward function; give 'package.module:function'")
  if weights and len(weights) != len(names):
    raise RewardError(
      f"rl.reward_weights={weights} has {len(weights)} weights for {len(names)} rl.rewards; "
      "give one per function, or () for 1 each"
    )
  if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
    raise RewardError(f"rl.reward_weights={weights} must be finite numbers")
  return Rewards(names, tuple(_import(name) for name in names), weights or (1.0,) * len(names))


def _import(name: str) -> RewardFn:
  module_name, sep, attribute = str(name).partition(":")
  if not sep or not module_name or not attribute:
    raise RewardError(f"rl.rewards entry {name!r} is not 'package.module:function'")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise RewardError(f"rl.rewards entry {name!r}: cannot import {module_name!r} ({e})") from e
  fn = getattr(module, attribute, None)
  if not callable(fn):
    raise RewardError(f"rl.rewards entry {name!r}: {module_name} has no function {attribute!r}")
  return fn
