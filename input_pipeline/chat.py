"""Chat data for supervised fine-tuning: ``data.source = "chat:PATH"``.

PATH is a JSON-lines file, one conversation per line: ``{"messages": [{"role": "system" | "user"
| "assistant", "content": "..."}, ...]}``. Each conversation is rendered with the tokenizer's
chat template (``tokenizer_config.json``'s ``chat_template``, or ``chat_template.jinja``; Loom's
own byte and SentencePiece tokenizers use ``FALLBACK_TEMPLATE``) and becomes one document whose
tokens carry a loss mask: only the assistant turns are trained on, each with the end its template
writes (``<|im_end|>``, ``<|eot_id|>``), and the end-of-document token after a final assistant
turn unless the template wrote that token itself (Qwen's and Llama 3's instruct tokenizers end
turns with their eos: it is not trained twice). The mask travels through packing into the
batch's ``weights``.

Rendering finds each assistant turn's text by rendering growing prefixes of the conversation:
the span between the prefix before the turn (with the generation prompt) and the prefix with it
is that turn's text, and it is tokenized on its own.

Bad lines (not JSON, no "messages" list, a message without a string role or content) are
counted and reported with their line numbers; a file without any assistant turn is an error.
Conversations go to validation by a hash of their line's text (``data.validation_percent``), or
by position when that leaves either split empty.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from input_pipeline import errors

_log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
# How conversations are tokenized, in the store's fingerprint: 2 since the end-of-document id after
# a conversation is not trained where the template wrote it (1: after every final assistant turn).
TOKENIZED = 2
# A plain template for tokenizers that bring none: role headers, the content, a blank line.
FALLBACK_TEMPLATE = (
  "{% for message in messages %}### {{ message['role'] }}:\n{{ message['content'] }}\n\n"
  "{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ChatSource:
  """A JSON-lines chat file: conversations split into train and validation."""

  spec: str
  identity: dict
  conversations: dict[str, list[list[dict[str, str]]]]  # split -> conversations
  kind: str = "chat"

  def documents(self, split: str) -> Iterator[list[dict[str, str]]]:
    yield from self.conversations[split]


def read(spec: str, validation_percent: int) -> ChatSource:
  """Parses and splits ``chat:PATH``; bad lines are reported, never silently dropped."""
  path = Path(spec[len("chat:") :]).expanduser()
  if not path.is_file():
    raise errors.DataNotFoundError(f"data.source={spec!r}: no such file {path}")
  good: list[tuple[str, list[dict[str, str]]]] = []
  bad: list[tuple[int, str]] = []
  raw = path.read_bytes()
  for number, line in json_lines(raw):
    problem, messages = _parse(line) if line is not None else (NOT_UTF8, [])
    if problem:
      bad.append((number, problem))
    else:
      good.append((line, messages))
  if bad:
    shown = "; ".join(f"line {n}: {p}" for n, p in bad[:5])
    _log.warning("%s: %d bad lines skipped (%s%s)", path, len(bad), shown, " ..." * (len(bad) > 5))
  if not any(m["role"] == "assistant" for _, messages in good for m in messages):
    detail = f"; bad lines: {shown}" if bad else ""
    raise errors.DataError(
      f"data.source={spec!r}: no conversation in {path} has an assistant turn, so there is "
      f"nothing to train on ({len(good)} good lines, {len(bad)} bad{detail})"
    )
  splits = split_lines(good, validation_percent, "conversation")
  identity = {
    "kind": "chat",
    "tokenized": TOKENIZED,
    "file_sha256": hashlib.sha256(raw).hexdigest(),
    "validation_percent": validation_percent,
    "bad_lines": len(bad),
  }
  return ChatSource(spec, identity, splits)


NOT_UTF8 = "not UTF-8"


def json_lines(raw: bytes) -> Iterator[tuple[int, str | None]]:
  """(line number, text) of each line of a JSON-lines file that is not blank; text None for a
  line that is not UTF-8. Lines end at newlines only: JSON strings may hold U+2028, U+0085 and
  the other characters ``str.splitlines`` would cut them at."""
  for number, line in enumerate(raw.split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      yield number, line.removesuffix(b"\r").decode("utf-8")
    except UnicodeDecodeError:
      yield number, None


def _parse(line: str) -> tuple[str, list[dict[str, str]]]:
  """(problem, messages): problem is "" for a good line."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    return f"not JSON ({e.msg})", []
  messages = record.get("messages") if isinstance(record, dict) else None
  if not isinstance(messages, list) or not messages:
    return 'no "messages" list', []
  return check_messages(messages)


def check_messages(
  messages: list, label: str = "message", roles: tuple[str, ...] | None = ROLES
) -> tuple[str, list[dict[str, Any]]]:
  """(problem, messages): problem is "" when each message has a role of ``roles`` and string
  content; the messages keep only those two keys. ``roles=None`` (prompts that are only
  rendered): any string role, and every key kept for the template (``name``, ``tool_calls``)."""
  for i, message in enumerate(messages):
    role = message.get("role") if isinstance(message, dict) else None
    if not (isinstance(role, str) if roles is None else role in roles):
      return f"{label} {i} has no role in {roles}" if roles else f"{label} {i} has no role", []
    if not isinstance(message.get("content"), str):
      return f"{label} {i} has no string content", []
  if roles is None:
    return "", [dict(m) for m in messages]
  return "", [{"role": m["role"], "content": m["content"]} for m in messages]


def split_lines(good: list[tuple[str, Any]], validation_percent: int, what: str) -> dict[str, list]:
  """Good (line, item) pairs into train and validation: by a hash of the line's text, or by
  position when that leaves either split empty. ``what`` names an item in messages."""
  splits: dict[str, list] = {"train": [], "validation": []}
  for line, item in good:
    bucket = int(hashlib.sha256(line.encode()).hexdigest()[:8], 16) % 100
    splits["validation" if bucket < validation_percent else "train"].append(item)
  if validation_percent and (not splits["train"] or not splits["validation"]):
    if len(good) < 2:
      raise errors.DataError(
        f"{len(good)} good {what}(s) cannot make both a train and a validation split; "
        f"add {what}s or set data.validation_percent=0"
      )
    cut = max(1, min(len(good) - 1, round(len(good) * (1 - validation_percent / 100))))
    _log.info("%s split by position: %d train, %d validation", what, cut, len(good) - cut)
    splits = {"train": [m for _, m in good[:cut]], "validation": [m for _, m in good[cut:]]}
  return splits


class Renderer:
  """Renders conversations with a chat template into (text, trainable) pieces."""

  def __init__(self, template: str | None, special_tokens: dict[str, str] | None = None):
    """``special_tokens``: the tokenizer's special tokens by name (``bos_token``, ``eos_token``,
    ...), which templates use as transformers' ``apply_chat_template`` passes them."""
    self.special_tokens = dict(special_tokens or {})

    def raise_exception(message):
      raise errors.DataError(f"the chat template refused a conversation: {message}")

    # As transformers builds its environment: loop controls ({% break %}, {% continue %}), which
    # Cohere's and other templates use.
    env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    try:
      self.template = env.from_string(template or FALLBACK_TEMPLATE)
    except jinja2.TemplateError as e:
      raise errors.DataError(f"the tokenizer's chat template does not parse: {e}") from e

  def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
      return self.template.render(
        **self.special_tokens, messages=messages, add_generation_prompt=generation_prompt
      )
    except errors.DataError:  # the template's own raise_exception
      raise
    except Exception as e:  # jinja's errors, and Python's from inside the template (TypeError...)
      raise errors.DataError(
        f"the chat template failed on a conversation: {type(e).__name__}: {e}"
      ) from e

  def pieces(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive pieces; assistant turns are trainable."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
      if message["role"] == "assistant":
        prompt = self.render(messages[:k], generation_prompt=True)
        if not prompt.startswith(done):
          raise errors.DataError("the chat template does not render conversations prefix-wise")
        pieces.append((prompt[len(done) :], False))
        done = prompt
      text = self.render(messages[: k + 1], generation_prompt=False)
      if not text.startswith(done):
        raise errors.DataError("the chat template does not render conversations prefix-wise")
      pieces.append((text[len(done) :], message["role"] == "assistant"))
      done = text
    return [(text, trainable) for text, trainable in pieces if text]
