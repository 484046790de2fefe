"""What every ``python -m ...`` command of Loom shares: ``run(main, ...)``.

In order, ``run`` applies the process settings (``settings.apply``), parses the flags (absl; a
bad flag, config file or ``--config.KEY=VALUE`` override is one ``loom: error:`` line and exit
2), starts ``jax.distributed`` when the command spans processes (``--coordinator_address
--num_processes --process_id``, or a cluster JAX detects), sets up logging (Loom's own messages
at INFO on process 0, WARNING elsewhere; the libraries' absl chatter off), and calls
``main(argv) -> exit code``.

Errors: a ``LoomError`` (bad config, data, checkpoint, ... : its message says what to change) is
printed as one ``loom: error: <message>`` line and exits with the error's ``exit_code``; so are
the command's own ``bad_input`` types, with exit 2. Anything else is a bug: its traceback, exit 1.
A started cluster is always ended here, in order (``distributed.end``).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

import configs
from input_pipeline.host import distributed, settings

# Exit codes scripts can rely on (docs/reliability.md).
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: its traceback is printed
EXIT_BAD_INPUT = 2  # a flag, config key, path, data or checkpoint that cannot be used as given
EXIT_DIVERGED = 3  # training kept producing non-finite or spiking losses
EXIT_IO = 4  # a checkpoint could not be written (older ones are intact)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT after saving; rerun to resume

CONFIGS_DIR = os.path.dirname(configs.__file__)
LOGGERS = ("loom", "input_pipeline")  # Loom's own loggers


class LoomError(Exception):
  """An error whose message tells the user what to change; a command prints it in one line."""

  exit_code = EXIT_BAD_INPUT
  # False where threads of the process may still hang (a given-up save): leave at once, without
  # the cluster's shutdown, even after an exit code every process agreed on.
  orderly_exit = True


def error(problem: BaseException | str, code: int = EXIT_BAD_INPUT) -> int:
  """Prints ``loom: error: <problem>`` to stderr; returns ``code``."""
  print(f"loom: error: {problem}", file=sys.stderr, flush=True)
  return code


def config_path(name: str) -> str:
  """A shipped config file by name (``"default.py"``)."""
  return os.path.join(CONFIGS_DIR, name)


def setup_logging(is_main: bool) -> None:
  """Loom's own messages at INFO on process 0 (WARNING elsewhere); libraries' INFO chatter off."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  for name in LOGGERS:
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False


_config_holder: flags.FlagHolder | None = None


def config():
  """The ``--config`` file's config (with its overrides); a LoomError names a file that failed
  to load and the shipped configs."""
  try:
    value = _config_holder.value
    value.keys()  # a file that failed to load gives a placeholder that raises on first use
    return value
  except Exception as e:  # noqa: BLE001 - ml_collections raises several kinds for a bad file
    shipped = ", ".join(
      sorted(n for n in os.listdir(CONFIGS_DIR) if n.endswith(".py") and not n.startswith("_"))
    )
    path = flags.FLAGS["config"].config_filename
    raise LoomError(
      f"--config {path}: {str(e).strip().splitlines()[-1].strip()}"
      f" (a config file defines get_config(); shipped: configs/ {shipped})"
    ) from e


def _flag_error_text(e: BaseException) -> str:
  """One line for a bad flag, config file or override (ml_collections wraps its messages)."""
  text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e) or type(e).__name__
  with contextlib.suppress(ValueError, SyntaxError):
    if text[:1] in "'\"":  # ml_collections wraps its unknown-key message in reprs
      text = ast.literal_eval(text)
  if isinstance(e, (KeyError, AttributeError)) and not text.startswith("module "):
    text = "unknown config key " + (text.replace("\n", " (") + ")" if "\n" in text else text)
  return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def run(
  main: Callable[[list[str]], int | None],
  *,
  usage: str,
  config_default: str | None = None,
  multi_process: bool = True,
  bad_input: tuple[type[BaseException], ...] = (),
  positional: int = 0,
  agreed_codes: tuple[int, ...] = distributed.ORDERLY_CODES,
  every_process_logs: bool = False,
) -> None:
  """Runs a command's ``main(argv)`` as described above; never returns.

  ``config_default``: define ``--config`` with this shipped file as its default (read it with
  ``config()``). ``multi_process``: take the distributed flags and start ``jax.distributed``.
  ``positional``: how many arguments may follow the command's name. ``agreed_codes``: the exit
  codes that every process of a cluster reaches together, after which it is shut down in order.
  ``every_process_logs``: Loom's INFO messages from every process, not only from process 0.
  """
  settings.apply()
  if multi_process:
    distributed.define_flags()

  def parse(argv: list[str]) -> list[str]:
    global _config_holder
    try:
      if config_default is not None:
        # Defined here, not at import: config_flags applies --config.KEY=VALUE overrides from
        # sys.argv as it is defined, and a bad one (an unknown key) must be reported like any
        # bad flag.
        _config_holder = config_flags.DEFINE_config_file(
          "config", config_path(config_default), "Config file."
        )
      return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags.Error, or whatever a config file raised
      error(_flag_error_text(e))
      print(usage, file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)

  def run_main(argv: list[str]) -> None:
    if len(argv) - 1 > positional:
      error(f"unexpected arguments: {argv[1 + positional :]}")
      print(usage, file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)
    started, code, orderly = False, EXIT_BUG, True
    # The error is held until the process ends: freeing it would first tear down what its frames
    # hold (the input pipeline's iterators and their threads), which a cluster's exit must not
    # wait for (under load that took long enough for process 0 to exit first and take the
    # coordination service with it).
    failure = None
    try:
      if multi_process:
        try:
          started = distributed.initialize_from_flags()
        except ValueError as e:  # a malformed or partial set of the cluster flags
          raise LoomError(str(e)) from e
      # A single-process command starts no backend here (train.plan picks its platform first).
      main_process = not multi_process or jax.process_index() == 0
      setup_logging(is_main=main_process or every_process_logs)
      code = main(argv) or EXIT_OK
    except LoomError as e:
      code, orderly, failure = error(e, e.exit_code), e.orderly_exit, e
    except bad_input as e:
      code, failure = error(e), e
    except BaseException as e:
      if not started:
        raise  # absl prints the traceback; exit 1
      traceback.print_exc()  # a cluster must still be ended below
      failure = e
    distributed.end(started, code, orderly=orderly and code in agreed_codes)
    del failure  # not reached with a cluster: end() exits at once

  app.run(run_main, flags_parser=parse)


def on_main_only() -> None:
  """Processes other than 0 compute but print nothing (for the life of the process)."""
  if jax.process_index() != 0:
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115


def quiet_libraries() -> None:
  """Only errors from absl-logging libraries (Orbax, TFDS): their chatter would bury a
  command's own output."""
  absl_logging.set_verbosity(absl_logging.ERROR)
