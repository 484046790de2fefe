"""What the loop runs at each eval: the validation loss over a fixed set of batches, a short greedy
sample of ``log.sample_prompt``, and the configured lm-eval ``harness.tasks``.

Every process calls it (the steps are global); process 0 alone writes the harness's
``DIR/eval/<step>.json``. The loop logs what it returns.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax

from input_pipeline.device import to_global
from train import dpo
from train.inference import generation, harness, loading
from train.inference.engine import Engine
from train.inference.loading import Model

_log = logging.getLogger("loom")


def validation_loss(
  eval_step, params, batches: list, bytes_per_token: float, reference=None
) -> dict[str, float]:
  """Loss, perplexity and bits per byte over ``batches`` (sums of losses over tokens); for DPO
  also ``dpo.METRICS`` as means over the validation pairs (``reference``: the state's copy)."""
  extra = () if reference is None else (reference,)
  totals = [eval_step(params, batch, *extra) for batch in batches]
  loss_sum = sum(float(t["loss_sum"]) for t in totals)
  tokens = sum(float(t["tokens"]) for t in totals)
  loss = loss_sum / max(tokens, 1.0)
  metrics = {
    "eval/loss": loss,
    "eval/perplexity": math.exp(min(loss, 50.0)),
    "eval/bits_per_byte": loss / math.log(2) / bytes_per_token,
  }
  if "pairs" in totals[0]:
    pairs = sum(float(t["pairs"]) for t in totals)
    metrics["eval/pairs"] = pairs
    for name in dpo.METRICS:
      metrics[f"eval/{name}"] = sum(float(t[name]) for t in totals) / max(pairs, 1.0)
  return metrics


class Validation:
  """The eval of one run: its fixed validation batches on the mesh, and an inference view of the
  model (built on first use) for the sample and the harness."""

  def __init__(self, run: Any):
    self.run, self.config = run, run.config
    self.batches = [
      to_global(batch, run.batch_sharding)
      for batch in run.checked(
        run.pipeline.eval_batches(
          global_batch_size=self.config.train.batch_size,
          num_batches=self.config.train.eval_batches,
          **run.data_share,
        )
      )
    ]
    self._model: Model | None = None

  def model(self, params, step: int) -> Model:
    """The run's model with these params, as inference code takes it (one engine, kept)."""
    if self._model is None:
      run = self.run
      graphdef, model_cfg = loading.for_inference(run.spec.graphdef, run.model_cfg)
      engine = Engine(graphdef, model_cfg, run.mesh, run.rules)
      self._model = Model(
        params,
        graphdef,
        model_cfg,
        run.pipeline.tokenizer,
        run.mesh,
        run.rules,
        step,
        run.config,
        engine,
      )
    return dataclasses.replace(self._model, params=params, step=step)

  def __call__(self, params, step: int, reference=None) -> tuple[dict[str, float], str | None]:
    """The eval metrics at ``step`` and the greedy sample (None when ``log.sample_tokens`` is 0).
    ``reference``: a DPO run's frozen reference copy (``train/dpo.py``), when its state has one."""
    log, harness_config = self.config.log, self.config.harness
    metrics = validation_loss(
      self.run.eval_step, params, self.batches, self.run.pipeline.bytes_per_token, reference
    )
    sample = None
    if log.sample_tokens > 0:
      try:
        sample = generation.greedy_sample(
          self.model(params, step), log.sample_prompt, int(log.sample_tokens)
        )
      except ValueError as e:  # a prompt the context cannot hold: the eval (and the save
        # after it) goes on without its sample
        _log.warning("log.sample_prompt: no sample at step %d: %s", step, e)
    if harness_config.tasks:
      results = harness.run_tasks(
        self.model(params, step),
        list(harness_config.tasks),
        include_path=harness_config.include_path or None,
        limit=harness_config.limit or None,
        num_fewshot=None if harness_config.num_fewshot < 0 else harness_config.num_fewshot,
        batch_size=harness_config.batch_size,
        seed=self.config.seed,
      )
      if jax.process_index() == 0:
        harness.write(self.run.workdir, results, metrics_lines=False, keep_earlier=False)
      metrics.update(results["metrics"])
    return metrics, sample
