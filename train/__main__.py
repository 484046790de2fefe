"""``python -m train --workdir DIR [--config configs/X.py] [--config.key=value ...]``.

Kept short on purpose: parse flags, start jax.distributed if the run spans processes, say which
processes and devices take part, hand over to ``trainer.train_and_evaluate``.
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import configs

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "default.py")

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, report.")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "HOST:PORT of process 0, for multi-process runs JAX cannot detect by itself.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flag_as_required("workdir")

# Exit codes scripts can rely on (README, "Exit codes"); 75 = preempted, see train/preemption.py.
EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_IO = 0, 2, 3, 4


def _setup_logging(is_main: bool) -> None:
  """Loom's own messages at INFO on process 0 (WARNING elsewhere); libraries' INFO chatter off."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  for name in ("loom", "input_pipeline"):
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  from train import checkpointing, distributed, loop, preemption, trainer

  if not jax.config.jax_compilation_cache_dir:
    # Restarts (resume, preemption, tests) then skip recompiling the same steps.
    jax.config.update(
      "jax_compilation_cache_dir", os.path.expanduser("~/.cache/loom/jax_compilation_cache")
    )
  multi = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  _setup_logging(is_main=jax.process_index() == 0)
  code = EXIT_OK
  try:
    report = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if report["preempted"]:
      code = preemption.EXIT_PREEMPTED
  except (ValueError, FileNotFoundError) as e:  # bad input: the message says what to change
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    code = EXIT_BAD_INPUT
  except loop.DivergenceError as e:
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    code = EXIT_DIVERGED
  except (checkpointing.CheckpointSaveError, OSError) as e:  # full disk, permissions, ...
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    code = EXIT_IO
  if multi:
    # Ending the cluster explicitly and leaving with os._exit avoids a CPU-client destructor
    # hang at interpreter exit seen in ~25% of multi-process runs (NOTES.md).
    sys.stdout.flush()
    sys.stderr.flush()
    jax.distributed.shutdown()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  app.run(main)
