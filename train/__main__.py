"""``python -m train --workdir DIR [--config configs/X.py] [--config.key=value ...]``.

Kept short on purpose: the shared command set-up (``input_pipeline/host/command.py``: settings,
flags, jax.distributed, logging, errors and exit codes), then ``trainer.train_and_evaluate``.
"""

import os

import jax
from absl import flags

from input_pipeline.host import command
from train import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, report.")
flags.mark_flag_as_required("workdir")

USAGE = "usage: python -m train --workdir DIR [--config FILE] [--config.KEY=VALUE ...]"


def main(argv: list[str]) -> int:
  if not jax.config.jax_compilation_cache_dir:
    # Restarts (resume, preemption, tests) then skip recompiling the same steps.
    jax.config.update(
      "jax_compilation_cache_dir", os.path.expanduser("~/.cache/loom/jax_compilation_cache")
    )
  report = trainer.train_and_evaluate(command.config(), _WORKDIR.value)
  return command.EXIT_PREEMPTED if report["preempted"] else command.EXIT_OK


if __name__ == "__main__":
  command.run(main, usage=USAGE, config_default="default.py")
