"""``python -m train.convert``: Hugging Face checkpoints in and out, proved by logits in the tests.

  python -m train.convert import HF_DIR --workdir DIR [--config configs/X.py] [--config.KEY=V]
  python -m train.convert export --workdir DIR [--step N] OUT_DIR [--dtype float32|bfloat16]
                                 [--max_shard_bytes 5000000000]

``import`` reads a local HF model directory (config.json, safetensors weights, tokenizer files)
and writes a Loom work directory: a parameters-only checkpoint at step 0 (the model config
derived from HF's config.json), the tokenizer under DIR/tokenizer, DIR/config.json. The config
file gives the numerics (model.dtype, model.param_dtype), the layer layout (model.scan_layers)
and the mesh. Sample from it with ``train.generate``, export it, or train from it with
``--config.checkpoint.init_from=loom:DIR`` in a new work directory.

``export`` writes ``model.safetensors`` (sharded with an index above --max_shard_bytes),
``config.json``, ``generation_config.json`` and the run's tokenizer files, loadable with
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)``. Families: GPT-2, Llama (2, 3,
3.1/3.2), Mistral, Qwen2/2.5, Qwen3. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

import configs

_WORKDIR = flags.DEFINE_string("workdir", None, "The Loom work directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "export dtype.")
_MAX_SHARD = flags.DEFINE_integer("max_shard_bytes", 5 * 10**9, "export: bytes per shard at most.")
_CONFIG = config_flags.DEFINE_config_file(
  "config", os.path.join(os.path.dirname(configs.__file__), "default.py"), "import: run config."
)

USAGE = "usage: python -m train.convert import HF_DIR --workdir DIR | export --workdir DIR OUT_DIR"


def main(argv: list[str]) -> None:
  import jax

  from input_pipeline.errors import DataError
  from train.config import ConfigError
  from train.hf import exporting, importing
  from train.hf.families import ConversionError

  args = argv[1:]
  if len(args) != 2 or args[0] not in ("import", "export"):
    print(f"loom: error: {USAGE}", file=sys.stderr)
    sys.exit(2)
  command, path = args
  try:
    if command == "import":
      result = importing.import_checkpoint(path, _WORKDIR.value, _CONFIG.value)
    else:
      result = exporting.export_checkpoint(
        _WORKDIR.value,
        path,
        step=_STEP.value,
        dtype=_DTYPE.value,
        max_shard_bytes=_MAX_SHARD.value,
      )
  except (ConversionError, ConfigError, DataError, FileNotFoundError) as e:
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
