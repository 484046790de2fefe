"""``train_and_evaluate(config, workdir)`` for GRPO: sample, score, update μ times, repeat.

A separate loop from ``train/loop.py`` because its batches are the policy's own samples: they
cannot be prepared ahead or dispatched before the previous update lands. Everything else is the
trainer's: validation, the mesh, the born-sharded state (with DPO's frozen reference copy, or
LoRA's adapters switched off), the one jitted train step (``train/step.py`` with
``train/grpo.py``'s objective), checkpoints, resume and the metrics file.

Rollout r (0-based) samples the prompts and keys that are pure functions of (seed, r)
(``train/rl/rollout.py``), then runs optimizer steps rμ + 1 .. (r + 1)μ on its batch.
Checkpoints fall on rollout boundaries (``checkpoint.every`` is a multiple of μ), so a resumed
run samples exactly what the uninterrupted run sampled and reproduces it bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from input_pipeline import tokenizers
from input_pipeline.host import settings, storage
from train import config as config_lib
from train import health, init_from, metrics_writer, trainer
from train.checkpoint import manager as checkpoint_lib
from train.cluster.preemption import PreemptionWatcher
from train.grpo import group_advantages
from train.inference.engine import Engine
from train.inference.sampling import Sampling
from train.rl import rewards as rewards_lib
from train.rl import rollout

log = logging.getLogger("loom")


@dataclasses.dataclass(frozen=True)
class PromptData:
  """What the trainer's ``Run`` reads of a data pipeline: the tokenizer and a fingerprint."""

  tokenizer: Any
  fingerprint: str


def fingerprint(config: ml_collections.ConfigDict) -> str:
  """The prompt files' bytes and the reward functions' names: a resumed run checks them."""
  digest = hashlib.sha256()
  for path in (config.rl.prompts, config.rl.eval_prompts):
    digest.update(storage.absolute(path).read_bytes() if path else b"")
  digest.update(json.dumps([list(config.rl.rewards), list(config.rl.reward_weights)]).encode())
  return digest.hexdigest()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs GRPO (resuming if ``workdir`` has a checkpoint); returns the summary."""
  settings.apply()
  config = init_from.adopt(config)
  resolved = config_lib.validate(config, workdir=workdir)  # rl group, rewards imported
  rewards = rewards_lib.load(config.rl.rewards, config.rl.reward_weights)
  workdir = config_lib.create_workdir(workdir)
  tokenizer = tokenizers.load_tokenizer(config.data)
  max_prompt = config.data.seq_len - config.rl.max_new_tokens
  prompts = rollout.read_prompts(
    config.rl.prompts, tokenizer, key="rl.prompts", max_tokens=max_prompt
  )
  held_out = None
  if config.rl.eval_prompts:
    held_out = rollout.read_prompts(
      config.rl.eval_prompts, tokenizer, key="rl.eval_prompts", max_tokens=max_prompt
    )
  # A reward function's wrong answer stops the run before compiling.
  probe(rewards, prompts, "rl.prompts")
  if held_out is not None:
    probe(rewards, held_out, "rl.eval_prompts")
  compiled = trainer.build_steps(config, resolved.mesh, resolved.rules, resolved.model_cfg)
  run = trainer.Run(
    config=config,
    workdir=workdir,
    mesh=resolved.mesh,
    rules=resolved.rules,
    pipeline=PromptData(tokenizer, fingerprint(config)),
    model_cfg=resolved.model_cfg,
    programs=compiled.programs,
    compiled_step=compiled.compiled_step,
    meter=compiled.meter,
  )
  watcher = PreemptionWatcher()
  ckpt = trainer.open_checkpoints(run, watcher, local=False)  # GRPO saves the persistent tier
  try:
    state, start_step = trainer.restore_or_init(run, ckpt)
    if start_step % config.rl.inner_steps:
      raise checkpoint_lib.CheckpointMismatchError(
        f"the checkpoint in {ckpt.directory} is at step {start_step}, which "
        f"rl.inner_steps={config.rl.inner_steps} does not divide (a rollout's updates would "
        "straddle it): resume with the run's own rl.inner_steps, or use a new --workdir"
      )
    finished = trainer.already_finished(run, start_step)
    if run.is_main and not finished:
      storage.write_atomic(
        storage.absolute(workdir) / "config.json", config.to_json_best_effort(indent=2)
      )
    trainer.log_startup(run, start_step)
    log.info(
      "rollouts: %d prompts × %d completions from %d prompts in %s (%s held out); rewards %s",
      config.train.batch_size // config.rl.group_size,
      config.rl.group_size,
      len(prompts),
      config.rl.prompts,
      len(held_out) if held_out is not None else "none",
      ", ".join(config.rl.rewards),
    )
    writer = metrics_writer.MetricsWriter(
      workdir,
      resume_step=start_step,
      tensorboard=config.log.tensorboard,
      enabled=run.is_main,
      wandb_project=config.log.wandb_project,
      config=json.loads(config.to_json_best_effort()),
    )
    try:
      loop = Loop(run, rewards, prompts, held_out, ckpt, writer, watcher)
      summary = loop.train(state, start_step)
      with run.meter.phase("checkpoint"):
        ckpt.wait(last=True)
    finally:
      writer.close()
  finally:
    ckpt.close()
    watcher.close()
  # The meter's report, as a pretraining run's (params, FLOPs, tokens, MFU, wall time by phase,
  # energy) with the loop's summary.
  return trainer.write_report(run, summary, keep_written=finished)


def probe(rewards: rewards_lib.Rewards, prompts: rollout.Prompts, key: str) -> None:
  """Calls every reward function with empty completions on the first two records of a prompt
  file and on the first record of each other set of fields in it, so one that fails or returns
  the wrong number of rewards is named, with the line, before anything compiles."""
  groups, kinds = [list(range(min(2, len(prompts))))], {frozenset(prompts.fields[0])}
  for row, record in enumerate(prompts.fields):
    if frozenset(record) not in kinds:
      kinds.add(frozenset(record))
      groups.append([row])
  for rows in groups:
    records = [prompts.fields[row] for row in rows]
    names = sorted({name for record in records for name in record})
    fields = {name: [record.get(name) for record in records] for name in names}
    try:
      rewards.score([prompts.texts[row] for row in rows], [""] * len(rows), fields)
    except rewards_lib.RewardError as e:
      lines = " and ".join(str(prompts.lines[row]) for row in rows)
      raise rewards_lib.RewardError(f"{key} line {lines}: {e}") from e


class Loop:
  """Rollouts and updates, with evals, checkpoints and metrics at rollout boundaries."""

  def __init__(self, run: trainer.Run, rewards, prompts, held_out, ckpt, writer, watcher):
    self.run, self.rewards, self.prompts, self.held_out = run, rewards, prompts, held_out
    self.ckpt, self.writer, self.watcher = ckpt, writer, watcher
    self.config = run.config
    self.rl = run.config.rl
    self.tokenizer = run.pipeline.tokenizer
    # The policy as the train step computes it (an MoE's dispatch included), so that the
    # sampler's log-probs and the train step's differ by the two programs' arithmetic only.
    self.engine = Engine(run.spec.graphdef, run.model_cfg, run.mesh, run.rules)
    self.sampling = Sampling(temperature=float(self.rl.temperature), top_p=float(self.rl.top_p))
    self.metadata = trainer.run_metadata(run)
    self.names = rewards_lib.metric_names(rewards.names)
    self.skips_in_a_row = 0  # skipped updates in a row (train.max_consecutive_skips)

  def train(self, state, start_step: int) -> dict[str, Any]:
    mu, total = self.rl.inner_steps, self.config.train.steps
    summary: dict[str, Any] = {"preempted": False, "restarted_from_step": start_step}
    started = time.perf_counter()
    if start_step == 0 and self.held_out is not None:
      with self.run.meter.phase("eval"):
        self.writer.write(0, self.evaluate(state["params"]))
    for r in range(start_step // mu, total // mu):
      state, values = self.rollout_and_update(state, r)
      step = (r + 1) * mu
      if _due(step, self.config.train.eval_every, total) and self.held_out is not None:
        with self.run.meter.phase("eval"):
          values.update(self.evaluate(state["params"]))
      self.writer.write(step, values)
      if _due(step, self.config.log.every, total):
        log.info("step %d: %s", step, _brief(values))
      stop = self.watcher.should_stop(step)
      if stop or _due(step, self.config.checkpoint.every, total):
        self.writer.flush()
        with self.run.meter.phase("checkpoint"):
          self.ckpt.save(step, state, self.metadata)
      if stop:
        with self.run.meter.phase("checkpoint"):
          self.ckpt.wait(last=True)
        summary["preempted"] = True
        break
    summary["loop_wall_time_s"] = time.perf_counter() - started
    summary["steps"] = float(self.config.train.steps)
    return summary

  def rollout_and_update(self, state, r: int):
    """Rollout ``r`` and its μ optimizer steps: the new state and the metrics to log."""
    rl = self.rl
    per_rollout = self.config.train.batch_size // rl.group_size
    rows = rollout.prompt_indices(self.config.seed, r, per_rollout, len(self.prompts))
    begin = time.perf_counter()
    done = rollout.sample(
      self.engine,
      state["params"],  # the train state's own arrays, in their training shardings
      self.prompts,
      rows,
      group_size=rl.group_size,
      max_new_tokens=rl.max_new_tokens,
      sampling=self.sampling,
      seed=rollout.sampling_seed(self.config.seed, r),
      tokenizer=self.tokenizer,
    )
    sampled = time.perf_counter()
    scores, total = self.score(self.prompts, done)
    advantages = group_advantages(np.asarray(total), rl.group_size)
    batch_np = rollout.train_batch(self.prompts, done, advantages, self.config.data.seq_len)
    batch = {key: _put(value, self.run.batch_sharding) for key, value in batch_np.items()}
    scored = time.perf_counter()
    step_metrics = []
    for _ in range(rl.inner_steps):
      state, metrics = self.run.compiled_step(state, batch)
      step_metrics.append(metrics)
    step_metrics = jax.device_get(step_metrics)  # one fetch per rollout
    self.check_skips(r * rl.inner_steps, step_metrics)
    updated = time.perf_counter()
    values = self.metrics(step_metrics, scores, total, advantages, done, batch_np)
    sample_s, update_s = sampled - begin, updated - scored
    sampled_tokens = sum(len(t) for t in done.tokens)
    train_tokens = float(np.sum(batch_np["segment_ids"] > 0)) * rl.inner_steps
    # The run's meter (report.json): the updates are its train phase and its tokens, those of
    # the prompts and completions (a rollout's rows are padded to seq_len, often half of them:
    # counting the padding had doubled the MFU); sampling and scoring are phases of their own.
    meter = self.run.meter
    meter.seconds["sample"] += sample_s
    meter.seconds["score"] += scored - sampled
    meter.seconds["train"] += update_s
    tokens = int(train_tokens)
    meter.tokens += tokens
    _, mfu = meter.record_window(tokens, update_s)
    values.update(
      {
        "perf/sample_tokens_per_second": sampled_tokens / max(sample_s, 1e-9),
        "perf/train_tokens_per_second": train_tokens / max(update_s, 1e-9),
        "perf/sampling_share": sample_s / max(updated - begin, 1e-9),
        "perf/step_time_s": updated - begin,
        "perf/mfu": mfu,  # of the updates, against the peak (train/meter/flops.py)
      }
    )
    return state, values

  def score(self, prompts, done: rollout.Completions):
    """Each reward function's scores of the completions, and their weighted total."""
    texts = [prompts.texts[row] for row in done.prompt_rows]
    records = [prompts.fields[row] for row in done.prompt_rows]
    keys = sorted({key for record in records for key in record})
    fields = {key: [record.get(key) for record in records] for key in keys}
    scores = self.rewards.score(texts, done.texts, fields)
    return scores, self.rewards.total(scores)

  def check_skips(self, first_step: int, step_metrics) -> None:
    """``train.max_consecutive_skips`` as a pretraining run applies it (train/health.py): skipped
    updates in a row, across rollouts, stop the run with the same message. GRPO detects no loss
    spikes (its loss measures no progress step to step), so every skip is a non-finite one."""
    policy = health.Policy.from_config(self.config.train)
    for i, m in enumerate(step_metrics):
      self.skips_in_a_row = self.skips_in_a_row + 1 if m["train/skipped"] else 0
      if self.skips_in_a_row:
        skip = health.Skip(
          step=first_step + i + 1,
          spike=False,
          loss=float(m["train/loss"]),
          grad_norm=float(m["train/grad_norm"]),
          in_a_row=self.skips_in_a_row,
        )
        health.after_skip(skip, policy, 0, self.ckpt.directory)

  def metrics(self, step_metrics, scores, total, advantages, done, batch_np) -> dict[str, float]:
    first, last = step_metrics[0], step_metrics[-1]
    mean = lambda key: float(np.mean([m[key] for m in step_metrics]))
    values = {
      "train/loss": mean("train/loss"),
      "train/kl": mean("train/kl"),
      "train/clip_fraction": mean("train/clip_fraction"),
      "train/ratio": mean("train/ratio"),
      # The sampler's log-probs against the train step's, before any update of this batch.
      "train/logprob_diff_max": float(first["train/logprob_diff_max"]),
      "train/grad_norm": float(last["train/grad_norm"]),
      "train/learning_rate": float(last["train/learning_rate"]),
      "train/skipped": float(sum(m["train/skipped"] for m in step_metrics)),
      "rl/reward": float(np.mean(total)),
      "rl/reward_std": float(np.std(total)),
      "rl/advantage_mean": float(np.mean(advantages)),
      "rl/advantage_std": float(np.std(advantages)),
      "rl/advantage_max_abs": float(np.max(np.abs(advantages))),
      "rl/completion_tokens": float(np.mean([len(t) for t in done.tokens])),
    }
    for name, key in zip(self.names, self.rewards.names, strict=True):
      values[f"rl/rewards/{name}/mean"] = float(np.mean(scores[key]))
      values[f"rl/rewards/{name}/std"] = float(np.std(scores[key]))
    return values

  def evaluate(self, params) -> dict[str, float]:
    """Greedy completions of the held-out prompts: their mean reward, per function and total."""
    held_out = self.held_out
    limit = self.rl.eval_limit or len(held_out)
    rows = list(range(min(limit, len(held_out))))
    done = rollout.sample(
      self.engine,
      params,
      held_out,
      rows,
      group_size=1,
      max_new_tokens=self.rl.max_new_tokens,
      sampling=Sampling(temperature=0.0),
      seed=0,
      tokenizer=self.tokenizer,
      with_logps=False,
    )
    scores, total = self.score(held_out, done)
    values = {"eval/reward": float(np.mean(total))}
    for name, key in zip(self.names, self.rewards.names, strict=True):
      values[f"eval/rewards/{name}"] = float(np.mean(scores[key]))
    return values


def _put(array: np.ndarray, sharding) -> jax.Array:
  # Every process built the same global batch (rewards need every completion); each places
  # only its addressable shards.
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _due(step: int, every: int, total: int) -> bool:
  return step == total or (every > 0 and step % every == 0)


def _brief(values: dict[str, float]) -> str:
  keys = ("rl/reward", "eval/reward", "train/loss", "train/kl", "train/logprob_diff_max")
  return ", ".join(f"{k} {values[k]:.4g}" for k in keys if k in values)
