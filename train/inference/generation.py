"""Text in, text out: ``generate(model, prompts)`` samples continuations and meters them.

The pieces: ``train/inference/sampling.py`` (temperature, top-k, top-p),
``train/inference/engine.py`` (the compiled prefill/decode engine, and how a batch of prompts of
different lengths stays exact) and ``train/inference/meter.py`` (the inference meter). Also the
short greedy sample the trainer logs at each eval, ``greedy_sample``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from input_pipeline import tokenizers
from train.inference.loading import Model
from train.inference.meter import inference_stats
from train.inference.sampling import Sampling
from train.meter import energy


@dataclasses.dataclass
class Result:
  texts: list[str]
  tokens: list[list[int]]
  stop_reasons: list[str]
  stats: dict[str, Any]  # the inference meter (see inference_stats)
  logits: list[np.ndarray] | None = None  # per prompt [generated, V], when record_logits


def generate(
  model: Model,
  prompts: Sequence[str],
  *,
  max_new_tokens: int = 128,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stream: Callable[[int, str], None] | None = None,
  record_logits: bool = False,
  measure_bandwidth: bool = True,
) -> Result:
  """Samples continuations of ``prompts`` (strings); returns texts and the inference meter.

  stream(row, text) receives each row's new text as its tokens arrive (held back while a
  multi-byte character is incomplete).
  """
  sampling = Sampling(temperature, top_k, top_p)
  tokenizer = model.tokenizer
  for i, prompt in enumerate(prompts):
    if not prompt:
      raise ValueError(f"prompt {i} is empty; give at least one character")
  ids = [tokenizers.encode_as_text_to_score(tokenizer, p) for p in prompts]
  printer = _StreamDecoder(tokenizer, ids, stream) if stream else None
  spans: list[energy.EnergySpan] = []  # measured from the end of compilation, as the time is
  out = model.engine.run(
    model.params,
    ids,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    seed=seed,
    eod_id=tokenizer.eod_id,
    on_token=printer.add if printer else None,
    record_logits=record_logits,
    on_start=lambda: spans.append(energy.EnergySpan.start()),
  )
  span = spans[0]
  measured = span.measured_joules()
  if printer:
    printer.flush()
  stats = inference_stats(
    model,
    out,
    prompt_tokens=sum(map(len, ids)),
    measured_joules=measured,
    measured_by=span.counter.source if span.counter else "",
    measure_bandwidth=measure_bandwidth,
  )
  texts = [continuation(tokenizer, p, t) for p, t in zip(ids, out.tokens, strict=True)]
  return Result(texts, out.tokens, out.stop_reasons, stats, out.logits)


PROMPT_TAIL = 8  # prompt tokens decoded with the new ones (a bounded cost per streamed token)


def continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
  """The text the new tokens add to the prompt's: decoded after the prompt's last tokens and
  their text cut off, since a SentencePiece-style decoder drops the leading space of a text's
  first token ("is" + "▁Paris" alone decodes to "isParis")."""
  tail = list(prompt_ids[-PROMPT_TAIL:])
  before = tokenizer.decode(tail)
  whole = tokenizer.decode(tail + list(new_ids))
  if whole.startswith(before):
    return whole[len(before) :]
  return tokenizer.decode(new_ids)


class _StreamDecoder:
  """Turns token ids into text deltas per row, holding back incomplete UTF-8 sequences."""

  def __init__(self, tokenizer, prompts: list[list[int]], emit: Callable[[int, str], None]):
    self.tokenizer, self.emit, self.prompts = tokenizer, emit, prompts
    self.ids: list[list[int]] = [[] for _ in prompts]
    self.shown = [0] * len(prompts)

  def add(self, row: int, token: int) -> None:
    self.ids[row].append(token)
    text = continuation(self.tokenizer, self.prompts[row], self.ids[row])
    if not text.endswith("\ufffd"):
      self._show(row, text)

  def flush(self) -> None:
    for row, ids in enumerate(self.ids):
      self._show(row, continuation(self.tokenizer, self.prompts[row], ids))

  def _show(self, row: int, text: str) -> None:
    if len(text) > self.shown[row]:
      self.emit(row, text[self.shown[row] :])
      self.shown[row] = len(text)


def greedy_sample(model: Model, prompt: str, max_new_tokens: int) -> str | None:
  """``prompt`` and its greedy continuation of ``max_new_tokens`` tokens (None for 0), without
  the meter: the short sample the trainer logs at each eval. Every process must call it (the
  steps are global); ``model.engine`` keeps its compiled steps between calls."""
  if max_new_tokens <= 0:
    return None
  tokenizer = model.tokenizer
  ids = tokenizers.encode_as_text_to_score(tokenizer, prompt)
  out = model.engine.run(
    model.params,
    [ids],
    max_new_tokens=max_new_tokens,
    sampling=Sampling(temperature=0.0),
    seed=int(model.config.seed),
    eod_id=tokenizer.eod_id,
  )
  return prompt + continuation(tokenizer, ids, out.tokens[0])
