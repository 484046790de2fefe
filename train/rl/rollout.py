"""GRPO's rollouts: prompts in, G sampled completions each, rewards, advantages, a train batch.

Prompts come from a JSON-lines file (``rl.prompts``): ``{"prompt": "text"}`` used as it is, or
``{"messages": [turns]}`` rendered with the tokenizer's chat template and its generation prompt
(``input_pipeline/chat.py``); every other field of a record (``answer``, ...) goes to the reward
functions. A bad line stops the run with its line number, before any work.

Which prompts a rollout takes is a pure function of (seed, rollout index), as the step-indexed
sampler does for text (a permutation per epoch), and so is the sampling key: a resumed run
samples exactly what the uninterrupted one did. The completions are sampled by the KV-cache
engine (``train/inference/engine.py``) from the train state's own parameters, in their training
shardings; only the tokens and their log-probabilities come to the host.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from input_pipeline import chat, tokenizers
from input_pipeline.errors import DataError
from input_pipeline.host import storage
from input_pipeline.host.command import LoomError
from train.inference.engine import Engine
from train.inference.sampling import Sampling


class PromptError(LoomError, ValueError):
  """A prompt file that is missing, empty, or has a bad line."""


@dataclasses.dataclass(frozen=True)
class Prompts:
  """A prompt file's records: the prompt texts, their token ids and their other fields."""

  texts: list[str]
  ids: list[list[int]]
  fields: list[dict[str, Any]]
  lines: list[int]  # each record's line number in its file

  def __len__(self) -> int:
    return len(self.texts)


def read_prompts(path: str, tokenizer, *, key: str, max_tokens: int) -> Prompts:
  """The records of ``path`` (config key ``key``), each prompt at most ``max_tokens`` tokens."""
  file = storage.absolute(path) if path else None
  if file is None or not file.exists():
    raise PromptError(f"{key}={path!r}: no such file; give a JSON-lines file of prompts")
  renderer = None  # made at the first conversation: plain prompts need no template
  texts, ids, fields, lines = [], [], [], []
  for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
    where = f"{key}={path!r} line {number}"
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise PromptError(f"{where} is not UTF-8 ({e.reason} at byte offset {e.start})") from e
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptError(f"{where} is not JSON ({e.msg})") from e
    if not isinstance(record, dict):
      raise PromptError(f"{where} is not a JSON object")
    # As TRL's GRPOTrainer tokenizes prompts: a plain one as transformers' tokenizer(text) (BOS
    # first for Llama's tokenizers), a conversation as its template renders it.
    if isinstance(record.get("prompt"), str) and record["prompt"]:
      text = record.pop("prompt")
      tokens = tokenizers.encode_as_text_to_score(tokenizer, text)
    elif isinstance(record.get("messages"), list) and record["messages"]:
      problem, messages = chat.check_messages(record.pop("messages"), roles=None)
      if problem:
        raise PromptError(f"{where}: {problem}")
      try:
        if renderer is None:
          renderer = chat.Renderer(
            getattr(tokenizer, "chat_template", None), getattr(tokenizer, "special_tokens", None)
          )
        text = renderer.render(messages, generation_prompt=True)
      except DataError as e:
        raise PromptError(f"{where}: {e}") from e
      tokens = tokenizer.encode(text)
    else:
      raise PromptError(f'{where} has no "prompt" string or "messages" list')
    if not 0 < len(tokens) <= max_tokens:
      raise PromptError(
        f"{where}: the prompt is {len(tokens)} tokens; at most {max_tokens} fit (data.seq_len "
        "less rl.max_new_tokens)"
      )
    texts.append(text)
    ids.append(tokens)
    fields.append(record)
    lines.append(number)
  if not texts:
    raise PromptError(f"{key}={path!r} holds no prompt")
  return Prompts(texts, ids, fields, lines)


def write_demo_file(path: str, lines: list[str]) -> None:
  """A demonstration's data file (``train.rl.digits``, ``digits_dpo``) in its work directory:
  written once; the same lines again leave it, another seed's are refused, since the run in that
  work directory was trained on the file."""
  try:
    storage.write_once(storage.absolute(path), "\n".join(lines) + "\n")
  except FileExistsError as e:
    raise LoomError(
      f"{e}: another seed's data; resume the run with its own --config.seed, or start another "
      "in a new --workdir"
    ) from e


def prompt_indices(seed: int, rollout: int, per_rollout: int, count: int) -> list[int]:
  """The prompts of rollout ``rollout``: positions rollout·P .. rollout·P + P - 1 of a sequence
  of permutations of ``count`` prompts, one permutation per epoch, each seeded by (seed,
  epoch)."""
  out = []
  for position in range(rollout * per_rollout, (rollout + 1) * per_rollout):
    epoch, index = divmod(position, count)
    out.append(int(np.random.default_rng([seed, epoch]).permutation(count)[index]))
  return out


def sampling_seed(seed: int, rollout: int) -> int:
  """The engine's sampling seed of rollout ``rollout``: a pure function of (seed, rollout)."""
  return int(np.random.SeedSequence([seed, rollout]).generate_state(1)[0] >> 1)


@dataclasses.dataclass
class Completions:
  """G completions of each of a rollout's prompts, rows grouped by prompt."""

  prompt_rows: list[int]  # the prompt (index into Prompts) of each row
  tokens: list[list[int]]  # sampled ids, the end-of-document id included where sampled
  logps: list[np.ndarray]  # the sampler's log-probability of each sampled id
  texts: list[str]  # the completions' text (end-of-document dropped)
  seconds: float  # wall time of the sampling


def sample(
  engine: Engine,
  params,
  prompts: Prompts,
  rows: list[int],
  *,
  group_size: int,
  max_new_tokens: int,
  sampling: Sampling,
  seed: int,
  tokenizer,
  with_logps: bool = True,
) -> Completions:
  """``group_size`` completions of each prompt of ``rows``, with the sampler's log-probs
  (empty without ``with_logps``, as greedy held-out samples need none)."""
  prompt_rows = [row for row in rows for _ in range(group_size)]
  out = engine.run(
    params,
    [prompts.ids[row] for row in prompt_rows],
    max_new_tokens=max_new_tokens,
    sampling=sampling,
    seed=seed,
    eod_id=tokenizer.eod_id,
    record_logps=with_logps,  # computed on the devices: no [rows, vocab] array to the host
  )
  tokens, logps = [], []
  for i, (generated, reason) in enumerate(zip(out.tokens, out.stop_reasons, strict=True)):
    ids = generated + ([tokenizer.eod_id] if reason == "eod" else [])
    tokens.append(ids)
    if with_logps:
      logps.append(out.logps[i][: len(ids)])
  texts = [tokenizer.decode(t) for t in out.tokens]
  seconds = out.time_to_first_token_s + out.decode_seconds
  return Completions(prompt_rows, tokens, logps, texts, seconds)


def train_batch(
  prompts: Prompts, completions: Completions, advantages: np.ndarray, seq_len: int
) -> dict[str, np.ndarray]:
  """One row per completion: the prompt and the completion, targets weighted on the
  completion only, with its advantage and the sampler's log-probs on those targets."""
  rows = len(completions.tokens)
  batch = {
    name: np.zeros((rows, seq_len), np.int32)
    for name in ("inputs", "targets", "positions", "segment_ids")
  }
  for name in ("weights", "advantages", "old_logps"):
    batch[name] = np.zeros((rows, seq_len), np.float32)
  for i, (prompt_row, tokens, logps) in enumerate(
    zip(completions.prompt_rows, completions.tokens, completions.logps, strict=True)
  ):
    prompt = prompts.ids[prompt_row]
    sequence = np.asarray(prompt + tokens, np.int32)
    length = len(sequence) - 1  # inputs: all but the last id; targets: all but the first
    batch["inputs"][i, :length] = sequence[:-1]
    batch["targets"][i, :length] = sequence[1:]
    batch["positions"][i, :length] = np.arange(length)
    batch["segment_ids"][i, :length] = 1
    first = len(prompt) - 1  # the target of this input is the completion's first id
    batch["weights"][i, first:length] = 1.0
    batch["advantages"][i, first:length] = advantages[i]
    batch["old_logps"][i, first:length] = logps
  return batch
