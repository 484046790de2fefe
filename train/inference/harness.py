"""EleutherAI's lm-eval harness on a Loom checkpoint: an ``lm_eval`` model on Loom's own sharded
forward pass (log-likelihoods) and KV-cache engine (generation).

Library (Colab)::

  from train.inference import harness, loading
  model = loading.load("/content/run")
  results = harness.run_tasks(model, ["my_task"], include_path="/content/tasks", limit=100)

Requests are scored in batches of equal rows: sorted by length, each batch padded at the end to
a multiple of 128 tokens (few compiled shapes), padding rows added to fill the last batch. A
causal model never lets a padded position change an earlier one, so no score depends on the
batch size or on what shares a batch (tested). Several processes: every process builds the same
requests, contributes its own rows of each batch (the batch is sharded over the data axes as in
training) and receives every row's score; lm-eval then computes the same result everywhere and
process 0 writes it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from input_pipeline import tokenizers
from input_pipeline.device import to_global
from input_pipeline.host import storage
from models import pipeline
from train.cluster import mesh as mesh_lib
from train.inference import tasks as task_index
from train.inference.loading import Model
from train.inference.sampling import Sampling

log = logging.getLogger("loom")

LENGTH_MULTIPLE = 128  # rows are padded to a multiple of this (or to the context, if shorter)
SCORE_CHUNK = 128  # positions whose logits exist at once while scoring


def _score_rows(params, inputs_BL, targets_BL, mask_BL, *, graphdef: nnx.GraphDef):
  """Per row: the summed log-probability of the masked targets, and whether each masked target
  is the model's greedy choice. Logits exist SCORE_CHUNK positions at a time."""
  model = nnx.merge(graphdef, params)
  b, length = inputs_BL.shape
  positions_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  h_BLD = model.features(inputs_BL, positions_BL)
  kernel_DV = model.output_kernel()
  chunk = math.gcd(length, SCORE_CHUNK)

  def split(x):  # [B, L, ...] -> [L / chunk, B, chunk, ...]
    return jnp.moveaxis(x.reshape(b, length // chunk, chunk, *x.shape[2:]), 1, 0)

  def one_chunk(carry, xs):
    h_BCD, targets_BC, mask_BC = xs
    logits_BCV = jnp.einsum("BCD,DV->BCV", h_BCD, kernel_DV, preferred_element_type=jnp.float32)
    target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], -1)[..., 0]
    logprob_BC = target_BC - jax.nn.logsumexp(logits_BCV, axis=-1)
    greedy_BC = jnp.argmax(logits_BCV, axis=-1) == targets_BC
    total_B, all_greedy_B = carry
    total_B = total_B + jnp.sum(jnp.where(mask_BC, logprob_BC, 0.0), axis=1)
    all_greedy_B = all_greedy_B & jnp.all(greedy_BC | ~mask_BC, axis=1)
    return (total_B, all_greedy_B), None

  init = (jnp.zeros((b,), jnp.float32), jnp.ones((b,), bool))
  (total_B, greedy_B), _ = jax.lax.scan(
    one_chunk, init, (split(h_BLD), split(targets_BL), split(mask_BL))
  )
  return total_B, greedy_B


@functools.lru_cache(maxsize=8)
def _score_program(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh):
  """``_score_rows`` jitted for one model structure on one mesh, shared by every Scorer of the
  process: a run that evaluates tasks at each eval makes a Scorer each time, and traces,
  lowers and compiles (or reads from the persistent cache) each row length once, not at every
  eval."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(_score_rows, graphdef=graphdef), out_shardings=replicated)


def prefix_id(tokenizer) -> int:
  """What an empty context and the first rolling window are conditioned on: BOS where the
  tokenizer has one, else the end-of-document token (lm-eval's ``prefix_token_id``)."""
  bos = getattr(tokenizer, "bos_id", None)
  return tokenizer.eod_id if bos is None else bos


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Token ids of a context and its continuation, as the harness's own ``hf`` model makes them:
  trailing spaces of the context move to the continuation, the continuation is the tail of the
  whole text's encoding, and an empty context becomes the prefix token (unless the
  continuation starts with it)."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  if not context:
    ids, prefix = tokenizer.encode(continuation), prefix_id(tokenizer)
    return ([prefix], ids) if not ids or ids[0] != prefix else (ids[:1], ids[1:])
  whole = tokenizers.encode_as_text_to_score(tokenizer, context + continuation)
  context_ids = tokenizers.encode_as_text_to_score(tokenizer, context)
  return context_ids, whole[len(context_ids) :]


class Scorer:
  """Log-likelihoods of (context, continuation) token lists on the model's mesh, in batches."""

  def __init__(self, model: Model, batch_size: int = 16):
    self.model = model
    self.context = model.model_cfg.max_seq_len
    shards = mesh_lib.data_parallel_size(model.mesh, model.rules)
    # On a training mesh with pipeline stages (in-training tasks) the rows are cut into the
    # pipeline's microbatches, each split over the batch shards (models/pipeline.py).
    stages = mesh_lib.ways(model.mesh, model.rules, "layers")[0]
    micro = 1
    if stages > 1:
      micro = pipeline.resolve_microbatches(model.model_cfg.pipeline_microbatches, stages)
    step = math.lcm(shards * micro, jax.process_count())
    self.batch = -(-batch_size // step) * step  # rows divide over the batch shards and processes
    # A context axis splits each row's length (models/context_parallel.py): lengths it divides.
    self.length_ways = mesh_lib.ways(model.mesh, model.rules, "length")[0]
    self.sharding = mesh_lib.batch_sharding(model.mesh, model.rules)
    self._score = _score_program(model.graphdef, model.mesh)
    self.rows_scored = 0

  def _row(self, context: list[int], continuation: list[int]):
    """inputs, targets, and how many of the last targets are the continuation's."""
    tokens = (context + continuation)[-(self.context + 1) :]
    return tokens[:-1], tokens[1:], min(len(continuation), len(tokens) - 1)

  def _padded_length(self, longest: int) -> int:
    multiple = math.lcm(min(LENGTH_MULTIPLE, self.context), self.length_ways)
    return min(-(-longest // multiple) * multiple, max(self.context, multiple))

  def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each continuation given its context, in the given order."""
    rows = [self._row(*pair) for pair in pairs]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    share = self.batch // jax.process_count()
    first = jax.process_index() * share
    with jax.set_mesh(self.model.mesh), nnx.logical_axis_rules(self.model.rules):
      for start in range(0, len(order), self.batch):
        members = order[start : start + self.batch]
        length = self._padded_length(max(len(rows[i][0]) for i in members))
        inputs = np.zeros((self.batch, length), np.int32)
        targets = np.zeros((self.batch, length), np.int32)
        mask = np.zeros((self.batch, length), bool)
        for r, i in enumerate(members):
          row_inputs, row_targets, scored = rows[i]
          inputs[r, : len(row_inputs)] = row_inputs
          targets[r, : len(row_targets)] = row_targets
          mask[r, len(row_targets) - scored : len(row_targets)] = True
        local = {
          "inputs": inputs[first : first + share],
          "targets": targets[first : first + share],
          "mask": mask[first : first + share],
        }
        batch = to_global(local, self.sharding)
        totals, greedy = jax.device_get(
          self._score(self.model.params, batch["inputs"], batch["targets"], batch["mask"])
        )
        for r, i in enumerate(members):
          results[i] = (float(totals[r]), bool(greedy[r]))
        self.rows_scored += len(members)
    return results


def _lm_class():
  from lm_eval.api.model import LM  # noqa: PLC0415 (the [eval] extra)
  from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: PLC0415

  class LoomLM(LM):
    """The lm_eval model: loglikelihood, loglikelihood_rolling and generate_until."""

    def __init__(self, model: Model, batch_size: int = 16):
      super().__init__()
      self.model, self.tokenizer = model, model.tokenizer
      self.scorer = Scorer(model, batch_size)
      self.requests = 0

    def loglikelihood(self, requests, disable_tqdm: bool = False):
      self.requests += len(requests)
      pairs = [encode_pair(self.tokenizer, *req.args) for req in requests]
      return self.scorer.score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
      self.requests += len(requests)
      windows, owner = [], []
      for index, req in enumerate(requests):
        (text,) = req.args
        for window in get_rolling_token_windows(
          tokenizers.encode_as_text_to_score(self.tokenizer, text),
          prefix_token=prefix_id(self.tokenizer),
          max_seq_len=self.scorer.context,
          context_len=1,
        ):
          windows.append(make_disjoint_window(window))
          owner.append(index)
      totals = [0.0] * len(requests)
      for index, (logprob, _) in zip(owner, self.scorer.score(windows), strict=True):
        totals[index] += logprob
      return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
      self.requests += len(requests)
      outputs = [""] * len(requests)
      groups: dict[str, list[int]] = {}
      for index, req in enumerate(requests):
        groups.setdefault(repr(sorted(req.args[1].items())), []).append(index)
      for members in groups.values():
        kwargs = dict(requests[members[0]].args[1])
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", 256))
        sample = kwargs.pop("do_sample", False) and kwargs.get("temperature", 1.0) > 0
        sampling = Sampling(float(kwargs.get("temperature", 1.0)) if sample else 0.0, 0, 1.0)
        keep = max(self.scorer.context - max_new, 1)
        for start in range(0, len(members), self.scorer.batch):
          chunk = members[start : start + self.scorer.batch]
          prompts = [tokenizers.encode_as_text_to_score(self.tokenizer, requests[i].args[0])[-keep:]
                     or [prefix_id(self.tokenizer)] for i in chunk]  # fmt: skip
          out = self.model.engine.run(
            self.model.params,
            prompts,
            max_new_tokens=max_new,
            sampling=sampling,
            seed=0,
            eod_id=self.tokenizer.eod_id,
          )
          for i, tokens in zip(chunk, out.tokens, strict=True):
            text = self.tokenizer.decode(tokens)
            cuts = [text.find(stop) for stop in until if stop and stop in text]
            outputs[i] = text[: min(cuts)] if cuts else text
      return outputs

  return LoomLM


def loom_lm(model: Model, batch_size: int = 16):
  """The lm_eval model (an ``lm_eval.api.model.LM``) for a loaded Loom checkpoint."""
  return _lm_class()(model, batch_size)


def flatten(results: dict[str, Any]) -> dict[str, float]:
  """lm-eval's per-task results as ``harness/<task>/<metric>`` numbers (filter "none" dropped,
  other filters kept as ``<metric>_<filter>``)."""
  flat = {}
  for task, metrics in results.get("results", {}).items():
    for key, value in metrics.items():
      if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
        continue
      metric, filter_name = key.split(",", 1)
      name = metric if filter_name == "none" else f"{metric}_{filter_name}"
      flat[f"harness/{task}/{name}"] = float(value)
  return flat


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> None:
  """Raises ValueError naming the tasks neither lm-eval nor ``include_path`` defines (and
  ImportError without lm-eval): before a model is loaded for them."""
  unknown = task_index.unknown(tasks, include_path)
  if unknown:
    where = f" or in --include_path {include_path}" if include_path else ""
    raise ValueError(
      f"unknown harness task(s) {unknown}: not among lm-eval's tasks{where}. Offline, define a "
      f"task by a YAML file with local data and pass its folder as --include_path"
    )


def _evaluate(lm, tasks, include_path, *, limit, num_fewshot, seed) -> dict[str, Any]:
  """What ``lm_eval.simple_evaluate`` does for a ready model (seeds, tasks, few-shot settings,
  then ``lm_eval.evaluator.evaluate``), without the report of the environment it ends with:
  torch imported and ``pip list`` run in a subprocess (torch's collect_env) and ``git
  describe``, on every process at every eval, 2.5 CPU-s a process and 0.7 s an eval after the
  first, for fields Loom does not keep. Python's and NumPy's global generators are seeded as
  there; torch's is not (nothing of Loom's runs on torch)."""
  from lm_eval import evaluator  # noqa: PLC0415 - the optional [eval] extra (check_tasks found it)

  random.seed(seed)
  np.random.seed(seed)
  loaded = task_index.manager_for(tasks, include_path or None).load(list(tasks))
  for task in loaded["tasks"].values():
    configured = task.get_config("num_fewshot")
    if num_fewshot is not None and configured != 0:  # a task set to 0 stays zero-shot
      task.set_config(key="num_fewshot", value=num_fewshot)
    elif num_fewshot is None and configured is None:
      task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=seed)
  return evaluator.evaluate(
    lm=lm,
    task_dict=loaded,
    limit=limit,
    bootstrap_iters=0,
    log_samples=False,
    fewshot_as_multiturn=True,  # simple_evaluate's default (used with chat templates only)
  )


def run_tasks(
  model: Model,
  tasks: Sequence[str],
  *,
  include_path: str | None = None,
  limit: float | None = None,
  num_fewshot: int | None = None,
  batch_size: int = 16,
  seed: int = 0,
) -> dict[str, Any]:
  """Runs lm-eval ``tasks`` on ``model``; returns its results (JSON-ready) with Loom's figures:
  ``requests``, ``requests_per_second``, ``wall_time_s``, and ``metrics`` (flattened)."""
  check_tasks(tasks, include_path)
  lm = loom_lm(model, batch_size)
  start = time.perf_counter()
  output = _evaluate(lm, tasks, include_path, limit=limit, num_fewshot=num_fewshot, seed=seed)
  seconds = time.perf_counter() - start
  keep = ("results", "versions", "n-shot", "higher_is_better", "n-samples", "configs")
  results = {key: output[key] for key in keep if key in output}
  results = json.loads(json.dumps(results, default=str))
  results.update(
    {
      "step": model.step,
      "tasks": list(tasks),
      "limit": limit,
      "num_fewshot": num_fewshot,
      "requests": lm.requests,
      "wall_time_s": seconds,
      "requests_per_second": lm.requests / seconds if seconds else 0.0,
      "processes": jax.process_count(),
      "metrics": flatten(output),
    }
  )
  return results


def write(
  workdir: str, results: dict[str, Any], *, metrics_lines: bool = True, keep_earlier: bool = True
) -> str:
  """``DIR/eval/<step>.json`` (whole, atomically; with ``keep_earlier``, where an earlier
  evaluation of that step wrote one, ``<step>.2.json``, ``<step>.3.json``, ...: none replaces
  another) and, with ``metrics_lines``, the flattened metrics as a line of ``DIR/metrics.jsonl``
  at that step (a training run logs them through its own writer instead, and replaces what a
  step redone after a restart or a rollback wrote); returns the JSON path."""
  root = storage.absolute(workdir)
  path = root / "eval" / f"{results['step']}.json"
  copy = 1
  while keep_earlier and path.exists():
    copy += 1
    path = root / "eval" / f"{results['step']}.{copy}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  storage.write_atomic(path, json.dumps(results, indent=1))
  if metrics_lines:
    line = {"step": results["step"], **results["metrics"]}
    storage.append_lines(root / "metrics.jsonl", [json.dumps(line)])
  return str(path)
