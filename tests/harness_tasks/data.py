"""Local data for the shipped offline lm-eval tasks: JSON lines beside this file, no hub."""

import json
import os

import datasets


def _load(name: str) -> dict[str, datasets.Dataset]:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {"test": datasets.Dataset.from_list(rows)}


def multiple_choice(**kwargs) -> dict[str, datasets.Dataset]:
  return _load("python_mc.jsonl")


def generation(**kwargs) -> dict[str, datasets.Dataset]:
  return _load("python_gen.jsonl")


def perplexity(**kwargs) -> dict[str, datasets.Dataset]:
  return _load("python_text.jsonl")
