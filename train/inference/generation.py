"""Text in, text out: ``generate(model, prompts)`` samples continuations and meters them.

The pieces: ``train/inference/sampling.py`` (temperature, top-k, top-p),
``train/inference/engine.py`` (the compiled prefill/decode engine, and how a batch of prompts of
different lengths stays exact) and ``train/inference/meter.py`` (the inference meter). Also the
trainer's eval-time sample, ``sample_for_eval``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from models.config import ModelConfig
from train.cluster import mesh as mesh_lib
from train.inference.engine import Engine
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
  ids = [tokenizer.encode(p) for p in prompts]
  printer = _StreamDecoder(tokenizer, len(prompts), stream) if stream else None
  span = energy.EnergySpan.start()
  out = model.engine.run(
    model.params,
    ids,
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    seed=seed,
    eod_id=tokenizer.eod_id,
    on_token=printer.add if printer else None,
    record_logits=record_logits,
  )
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
  texts = [tokenizer.decode(t) for t in out.tokens]
  return Result(texts, out.tokens, out.stop_reasons, stats, out.logits)


class _StreamDecoder:
  """Turns token ids into text deltas per row, holding back incomplete UTF-8 sequences."""

  def __init__(self, tokenizer, rows: int, emit: Callable[[int, str], None]):
    self.tokenizer, self.emit = tokenizer, emit
    self.ids: list[list[int]] = [[] for _ in range(rows)]
    self.shown = [0] * rows

  def add(self, row: int, token: int) -> None:
    self.ids[row].append(token)
    text = self.tokenizer.decode(self.ids[row])
    if not text.endswith("\ufffd"):
      self._show(row, text)

  def flush(self) -> None:
    for row, ids in enumerate(self.ids):
      self._show(row, self.tokenizer.decode(ids))

  def _show(self, row: int, text: str) -> None:
    if len(text) > self.shown[row]:
      self.emit(row, text[self.shown[row] :])
      self.shown[row] = len(text)


# --- the trainer's eval-time sample ---


@functools.lru_cache(maxsize=4)
def _eval_engine(
  graphdef: nnx.GraphDef, model_cfg: ModelConfig, mesh: jax.sharding.Mesh, rules: mesh_lib.Rules
) -> Engine:
  return Engine(graphdef, model_cfg, mesh, rules)


def sample_for_eval(run: Any, params: Any) -> str | None:
  """A short greedy continuation of ``log.sample_prompt`` (None when ``log.sample_tokens`` is 0).

  For the trainer at each eval: ``run`` is its ``trainer.Run``, ``params`` the state's params.
  The compiled steps are kept between evals. Every process must call it (the steps are global).
  """
  tokens = int(run.config.log.sample_tokens)
  if tokens <= 0:
    return None
  tokenizer = run.pipeline.tokenizer
  prompt = tokenizer.encode(run.config.log.sample_prompt)
  engine = _eval_engine(run.spec.graphdef, run.model_cfg, run.mesh, run.rules)
  out = engine.run(
    params,
    [prompt],
    max_new_tokens=tokens,
    sampling=Sampling(temperature=0.0),
    seed=run.config.seed,
    eod_id=tokenizer.eod_id,
  )
  return run.config.log.sample_prompt + tokenizer.decode(out.tokens[0])
