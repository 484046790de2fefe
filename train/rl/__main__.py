"""``python -m train.rl --workdir DIR [--config configs/X.py] [--config.key=value ...]``: GRPO.

The config's ``train.objective`` must be "grpo" and its ``rl`` group name the prompts and the
reward functions (``configs/default.py``). The shared command set-up, then
``train/rl/loop.py``'s ``train_and_evaluate``.
"""

from absl import flags

from input_pipeline.host import command
from train.rl import loop

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, report.")
flags.mark_flag_as_required("workdir")

USAGE = "usage: python -m train.rl --workdir DIR [--config FILE] [--config.KEY=VALUE ...]"


def main(argv: list[str]) -> int:
  del argv
  config = command.config()
  if config.train.objective != "grpo":
    return command.error(
      f"train.objective={config.train.objective!r}: python -m train.rl runs 'grpo' only; set "
      "--config.train.objective=grpo (python -m train runs 'lm' and 'dpo')"
    )
  report = loop.train_and_evaluate(config, _WORKDIR.value)
  return command.EXIT_PREEMPTED if report["preempted"] else command.EXIT_OK


if __name__ == "__main__":
  command.run(main, usage=USAGE, config_default="default.py")
