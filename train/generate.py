"""``python -m train.generate --workdir DIR --prompt TEXT [--prompt TEXT ...] [--prompts_file F]
[--step N] [--max_new_tokens 128] [--temperature 1.0 | --greedy] [--top_k 0] [--top_p 1.0]
[--seed 0] [--json]``: sample from a checkpoint with a KV cache, metered.

A thin command over ``train/inference/`` (loading, generation, the engine and its meter); library
use is documented in ``train/inference/loading.py``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
from absl import flags

from input_pipeline.host import command
from train.inference import generation, loading
from train.inference.sampling import Sampling


def _read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
  texts = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise FileNotFoundError(f"--prompts_file {prompts_file}: no such file")
    with open(prompts_file, encoding="utf-8") as f:
      texts += [line.rstrip("\n") for line in f if line.strip()]
  if not texts:
    raise ValueError("no prompts given; pass --prompt TEXT (repeatable) or --prompts_file FILE")
  return texts


def main(argv: Sequence[str]) -> int:
  f = flags.FLAGS
  command.quiet_libraries()  # Orbax/TFDS chatter would bury the text
  command.on_main_only()  # every process computes; process 0 alone prints
  prompts = _read_prompts(f.prompt or [], f.prompts_file)
  if f.max_new_tokens < 1:  # before the checkpoint is read
    raise ValueError(f"--max_new_tokens={f.max_new_tokens} must be a positive integer")
  sampling = Sampling(0.0 if f.greedy else f.temperature, f.top_k, f.top_p)
  model = loading.load(f.workdir, f.step)
  single = len(prompts) == 1
  shown = []  # the prompt, printed with the first new text: an error is never on its line

  def stream(row: int, text: str) -> None:
    if not shown:
      shown.append(print(prompts[0], end=""))
    print(text, end="", flush=True)

  result = generation.generate(
    model,
    prompts,
    max_new_tokens=f.max_new_tokens,
    temperature=sampling.temperature,
    top_k=sampling.top_k,
    top_p=sampling.top_p,
    seed=f.seed,
    stream=stream if single and not f.json else None,
  )
  if single and not f.json:
    print("" if shown else prompts[0])
  elif not f.json:
    for prompt, text in zip(prompts, result.texts, strict=True):
      print(f"--- {prompt!r}\n{prompt}{text}\n")
  stats = result.stats
  if f.json:
    print(
      json.dumps(
        {"texts": result.texts, "prompts": prompts, "stop_reasons": result.stop_reasons, **stats}
      )
    )
  elif jax.process_index() == 0:
    print(_summary(stats), file=sys.stderr)
  return command.EXIT_OK


def _summary(stats: dict[str, Any]) -> str:
  decode = stats["decode_tokens_per_second"]
  util = stats["bandwidth_utilisation"]
  per_1k = stats["energy_kwh_per_1k_tokens"]
  return (
    f"[step {stats['step']}] prefill {stats['prefill_tokens_per_second']:,.0f} tok/s, first "
    f"token {stats['time_to_first_token_s'] * 1e3:.1f} ms, decode "
    f"{'n/a' if decode is None else f'{decode:,.1f}'} tok/s (measured), "
    f"{stats['flops_per_generated_token']:,} FLOPs/token (estimated), bandwidth "
    f"{'n/a' if util is None else f'{util:.1%}'} of measured copy, "
    f"{'n/a' if per_1k is None else f'{per_1k:.3g}'} kWh per 1k tokens ({stats['energy_source']})"
  )


flags.DEFINE_string("workdir", None, "Run directory with checkpoints/.", required=True)
flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for a batch).")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
flags.DEFINE_float("temperature", 1.0, "Softmax temperature (0 = greedy).")
flags.DEFINE_boolean("greedy", False, "Always take the most likely token (temperature 0).")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Sample within the nucleus of this probability mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_boolean("json", False, "Print one JSON object last (texts and the meter).")

USAGE = "usage: python -m train.generate --workdir DIR --prompt TEXT [--prompt TEXT ...] [...]"

if __name__ == "__main__":
  command.run(main, usage=USAGE, bad_input=(ValueError, FileNotFoundError))
