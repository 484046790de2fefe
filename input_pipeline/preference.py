"""Preference data for DPO and its kin: ``data.source = "prefs:PATH"``.

PATH is a JSON-lines file, one comparison per line: ``{"prompt": "...", "chosen": "...",
"rejected": "..."}`` with plain strings, or ``{"messages": [turns], "chosen": ..., "rejected":
...}`` (or ``"prompt": [turns]``) where the prompt is a conversation and each completion is an
assistant turn (a string, a message dict, or a one-message list). Conversations are rendered with
the tokenizer's chat template as ``chat:`` renders them (``input_pipeline/chat.py``): the prompt
with the generation prompt, the completion as the text the template adds for the assistant turn.

Each comparison becomes two documents, prompt + chosen and prompt + rejected, tokenized as TRL's
DPOTrainer tokenizes them (``PairRenderer.pair``); only the completion tokens carry loss weight
(TRL's ``completion_mask``): a plain-string completion ends with the end-of-document id, trained
(TRL's added EOS), a chat completion with what the template ends an assistant turn with, and the
end-of-document id where that is not it.

Bad lines (not JSON, no prompt, no ``chosen`` or ``rejected``, wrong types, empty completions)
are counted and reported with their line numbers; a file without a good line is an error naming
it. Comparisons go to validation by a hash of their line's text (``data.validation_percent``),
or by position when that leaves either split empty, as ``chat:`` splits conversations.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from input_pipeline import chat, errors, tokenizers

_log = logging.getLogger(__name__)

PREFIX = "prefs:"
# How pairs are tokenized, in the store's fingerprint: 2 since BOS, one tokenization of each whole
# sequence and no second end-of-document id after a template's (1: prompt and completion apart).
TOKENIZED = 2


@dataclasses.dataclass(frozen=True)
class Record:
  """One comparison: the prompt (a string or chat turns) and its two completions."""

  prompt: str | list[dict[str, str]]
  chosen: str
  rejected: str


@dataclasses.dataclass(frozen=True)
class PreferenceSource:
  """A JSON-lines preference file: comparisons split into train and validation."""

  spec: str
  identity: dict
  records: dict[str, list[Record]]  # split -> comparisons
  kind: str = "prefs"

  def documents(self, split: str) -> Iterator[Record]:
    yield from self.records[split]


def read(spec: str, validation_percent: int) -> PreferenceSource:
  """Parses and splits ``prefs:PATH``; bad lines are reported, never silently dropped."""
  path = Path(spec[len(PREFIX) :]).expanduser()
  if not path.is_file():
    raise errors.DataNotFoundError(f"data.source={spec!r}: no such file {path}")
  good: list[tuple[str, Record]] = []
  bad: list[tuple[int, str]] = []
  raw = path.read_bytes()
  for number, line in chat.json_lines(raw):
    problem, record = parse(line) if line is not None else (chat.NOT_UTF8, None)
    if problem:
      bad.append((number, problem))
    else:
      good.append((line, record))
  shown = "; ".join(f"line {n}: {p}" for n, p in bad[:5]) + " ..." * (len(bad) > 5)
  if bad:
    _log.warning("%s: %d bad lines skipped (%s)", path, len(bad), shown)
  if not good:
    raise errors.DataError(
      f"data.source={spec!r}: no valid preference record in {path} ({len(bad)} bad lines: "
      f"{shown or 'the file is empty'}); each line needs a prompt or messages, chosen and rejected"
    )
  identity = {
    "kind": "prefs",
    "tokenized": TOKENIZED,
    "file_sha256": hashlib.sha256(raw).hexdigest(),
    "validation_percent": validation_percent,
    "bad_lines": len(bad),
  }
  return PreferenceSource(spec, identity, chat.split_lines(good, validation_percent, "comparison"))


def parse(line: str) -> tuple[str, Record | None]:
  """(problem, record): problem is "" for a good line."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    return f"not JSON ({e.msg})", None
  if not isinstance(record, dict):
    return "not a JSON object", None
  prompt = record.get("prompt", record.get("messages"))
  if prompt is None:
    return 'no "prompt" or "messages"', None
  if isinstance(prompt, list):
    problem, prompt = _turns(prompt, "prompt")
    if problem:
      return problem, None
  elif not isinstance(prompt, str):
    return '"prompt" is neither a string nor a list of messages', None
  elif not prompt:  # the completion's first token would have no token before it to predict it
    return '"prompt" is empty', None
  completions = []
  for key in ("chosen", "rejected"):
    if key not in record:
      return f'no "{key}"', None
    problem, text = _completion(record[key], key, chat_prompt=isinstance(prompt, list))
    if problem:
      return problem, None
    completions.append(text)
  return "", Record(prompt, *completions)


def _turns(messages: list, key: str) -> tuple[str, list[dict[str, str]]]:
  if not messages:
    return f'"{key}" is an empty list', []
  return chat.check_messages(messages, f"{key} message")


def _completion(value, key: str, chat_prompt: bool) -> tuple[str, str]:
  """A completion as text: a string, or (after a chat prompt) one assistant message."""
  if isinstance(value, list) and len(value) == 1:
    value = value[0]
  if isinstance(value, dict):
    if not chat_prompt:
      return f'"{key}" is a message but the prompt is a plain string', ""
    if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
      return f'"{key}" is not an assistant message with string content', ""
    value = value["content"]
  if not isinstance(value, str):
    return f'"{key}" is not a string or an assistant message', ""
  if not value:
    return f'"{key}" is empty', ""
  return "", value


class PairRenderer:
  """Turns a record into the token ids and loss masks of its two documents, as TRL's DPOTrainer
  tokenizes them (1.16, ``_prepare_dataset``)."""

  def __init__(self, template: str | None, tokenizer):
    self.chat = chat.Renderer(template, getattr(tokenizer, "special_tokens", None))
    self.tokenizer = tokenizer

  def texts(self, record: Record) -> tuple[str, str, str]:
    """(prompt, prompt + chosen, prompt + rejected) as text: a chat prompt rendered with the
    generation prompt, each conversation with its assistant turn."""
    if isinstance(record.prompt, str):
      return record.prompt, record.prompt + record.chosen, record.prompt + record.rejected
    prompt = self.chat.render(record.prompt, generation_prompt=True)
    full = [
      self.chat.render([*record.prompt, {"role": "assistant", "content": text}], False)
      for text in (record.chosen, record.rejected)
    ]
    return prompt, full[0], full[1]

  def pair(self, record: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(chosen ids, chosen mask, rejected ids, rejected mask), the mask 1 on the completion.

    - A plain-string record is tokenized as transformers' ``tokenizer(text)`` does (BOS first for
      Llama's tokenizers), and each completion ends with the end-of-document id (TRL appends the
      EOS text), trained.
    - A conversation is tokenized as rendered (the template writes its own BOS). Where the
      template ends the assistant turn with the end-of-document token (Qwen's instruct tokenizers
      end turns with their eos <|im_end|>, Llama 3's with <|eot_id|>) nothing follows, as TRL adds
      nothing to conversations; where it does not (Loom's FALLBACK_TEMPLATE; a base model's
      tokenizer whose eos is not the turn's end) the end-of-document id follows, trained: it is
      where Loom's sampler stops (TRL would leave that to a generation config).
    - The prompt and each whole sequence are tokenized apart; the completion starts where the
      prompt's ids and both sequences' ids part (TRL's ``common_prefix_length``), so a token that
      straddles the boundary, or a template that renders the prompt alone differently, moves the
      boundary, never the tokens."""
    prompt, *sequences = self.texts(record)
    plain = isinstance(record.prompt, str)
    if plain:
      encode = functools.partial(tokenizers.encode_as_text_to_score, self.tokenizer)
    else:
      encode = self.tokenizer.encode
    prompt_ids = encode(prompt)
    full = [encode(text) for text in sequences]
    shared = min(_common_prefix(prompt_ids, ids) for ids in full)
    eod = self.tokenizer.eod_id
    if plain:
      full = [ids if ids and ids[-1] == eod else [*ids, eod] for ids in full]
    else:
      full = [ids if eod in ids[shared:] else [*ids, eod] for ids in full]
    out = []
    for ids in full:
      mask = np.zeros(len(ids), np.uint8)
      mask[shared:] = 1
      out += [np.asarray(ids, np.int64), mask]
    return tuple(out)


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  for x, y in zip(a, b, strict=False):
    if x != y:
      break
    n += 1
  return n
