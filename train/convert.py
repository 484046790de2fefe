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
3.1/3.2), Mistral, Qwen2/2.5, Qwen3, and the mixtures of experts Mixtral and Qwen3-MoE. The last
line printed is one JSON object.
"""

from __future__ import annotations

import json

import jax
from absl import flags

from input_pipeline.host import command
from train.hf import exporting, importing

_WORKDIR = flags.DEFINE_string("workdir", None, "The Loom work directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "export dtype.")
_MAX_SHARD = flags.DEFINE_integer("max_shard_bytes", 5 * 10**9, "export: bytes per shard at most.")

USAGE = "usage: python -m train.convert import HF_DIR --workdir DIR | export --workdir DIR OUT_DIR"


def main(argv: list[str]) -> int:
  args = argv[1:]
  if len(args) != 2 or args[0] not in ("import", "export"):
    return command.error(USAGE)
  verb, path = args
  if verb == "import":
    result = importing.import_checkpoint(path, _WORKDIR.value, command.config())
  else:
    result = exporting.export_checkpoint(
      _WORKDIR.value,
      path,
      step=_STEP.value,
      dtype=_DTYPE.value,
      max_shard_bytes=_MAX_SHARD.value,
    )
  if jax.process_index() == 0:
    print(json.dumps(result), flush=True)
  return command.EXIT_OK


if __name__ == "__main__":
  command.run(
    main,
    usage=USAGE,
    config_default="default.py",
    positional=2,
    # A step without a checkpoint, failed checksums, another run's data (loading.load), an
    # output path under a file: one line each.
    bad_input=(ValueError, OSError),
  )
