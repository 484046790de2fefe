"""``python -m train --workdir DIR [--config configs/X.py] [--config.key=value ...]``.

Kept short on purpose: parse flags, start jax.distributed if the run spans processes, say which
processes and devices take part, hand over to ``trainer.train_and_evaluate``.
"""

import ast
import contextlib
import logging
import os
import sys
import traceback

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import configs
from train.cluster import distributed as distributed_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "default.py")

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, report.")
distributed_flags.define_flags()  # --coordinator_address, --num_processes, --process_id
flags.mark_flag_as_required("workdir")

# Exit codes scripts can rely on (README, "Exit codes"); 75 = preempted (cluster/preemption.py).
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


def _load_config():
  """The --config file's config, or a ConfigError naming the file and the valid configs."""
  from train.config import ConfigError

  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load gives a placeholder that raises on first use
    return config
  except Exception as e:  # noqa: BLE001 - ml_collections raises several kinds for a bad file
    shipped = ", ".join(
      sorted(
        n
        for n in os.listdir(os.path.dirname(_DEFAULT_CONFIG))
        if n.endswith(".py") and not n.startswith("_")
      )
    )
    path = flags.FLAGS["config"].config_filename
    raise ConfigError(
      f"--config {path}: {str(e).strip().splitlines()[-1].strip()}"
      f" (a config file defines get_config(); shipped: configs/ {shipped})"
    ) from e


def _run() -> tuple[int, bool]:
  """Trains; returns (exit code, whether jax.distributed was started)."""
  import jax

  from input_pipeline.errors import DataError
  from train import loop, trainer
  from train.checkpoint import manager
  from train.cluster import distributed, preemption
  from train.config import ConfigError

  multi = False
  try:
    config = _load_config()
    try:
      multi = distributed.initialize_from_flags()
    except ValueError as e:  # a malformed or partial set of the cluster flags
      raise ConfigError(str(e)) from e
    _setup_logging(is_main=jax.process_index() == 0)
    report = trainer.train_and_evaluate(config, _WORKDIR.value)
    return (preemption.EXIT_PREEMPTED if report["preempted"] else EXIT_OK), multi
  except (
    ConfigError,
    DataError,
    manager.CheckpointMismatchError,
    manager.CheckpointCorruptError,
  ) as e:
    # Bad input: the message says what to change; a traceback would only bury it.
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT, multi
  except loop.DivergenceError as e:
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    return EXIT_DIVERGED, multi
  except manager.CheckpointSaveError as e:  # full disk, lost permissions, ...
    print(f"loom: error: {e}", file=sys.stderr, flush=True)
    return EXIT_IO, multi


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  if not jax.config.jax_compilation_cache_dir:
    # Restarts (resume, preemption, tests) then skip recompiling the same steps.
    jax.config.update(
      "jax_compilation_cache_dir", os.path.expanduser("~/.cache/loom/jax_compilation_cache")
    )
  code, multi = 1, False
  try:
    code, multi = _run()
  finally:  # any other exception keeps its traceback, and a cluster is still ended cleanly
    if multi or jax.process_count() > 1:
      # Ending the cluster explicitly and leaving with os._exit avoids a CPU-client destructor
      # hang at interpreter exit seen in ~25% of multi-process runs (NOTES.md).
      if code == 1:
        traceback.print_exc()
      sys.stdout.flush()
      sys.stderr.flush()
      if code in (EXIT_OK, 75):
        jax.distributed.shutdown()
      # After a failure the others may be waiting in a collective for this process: an orderly
      # shutdown would wait 5 minutes at its barrier for them. Leaving at once lets the
      # coordination service's heartbeats end them instead.
      os._exit(code)
  sys.exit(code)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config file reported in one line (exit 2)."""
  global _CONFIG
  try:
    # Defined here, not at import: config_flags applies --config.KEY=VALUE overrides from sys.argv
    # as it is defined, and a bad one (an unknown key) must be reported like any bad flag.
    _CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.")
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flags.Error, or whatever a config file raised
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e) or type(e).__name__
    with contextlib.suppress(ValueError, SyntaxError):
      if text[:1] in "'\"":  # ml_collections wraps its unknown-key message in reprs
        text = ast.literal_eval(text)
    if isinstance(e, (KeyError, AttributeError)) and not text.startswith("module "):
      text = "unknown config key " + (text.replace("\n", " (") + ")" if "\n" in text else text)
    message = "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    print(f"loom: error: {message}", file=sys.stderr, flush=True)
    print(
      "usage: python -m train --workdir DIR [--config FILE] [--config.KEY=VALUE ...]",
      file=sys.stderr,
    )
    sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
