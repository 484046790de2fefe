"""``python -m train.checkpoint verify DIR``: check a run's checkpoints against their checksums.

DIR is a work directory or its ``checkpoints/`` folder. Prints one line per checkpoint (``ok``,
``unsealed`` = complete but saved by a process that died before recording checksums, or the
problems found) and exits 1 if any checkpoint is corrupt, 2 for a path that is not a run's.
Reads files only: no restore. With ``--coordinator_address/--num_processes/--process_id`` (as
``python -m train``) the processes share the checks and process 0 prints the result.
"""

from __future__ import annotations

import jax

from input_pipeline.host import command
from train.checkpoint import integrity

USAGE = "usage: python -m train.checkpoint verify DIR [--coordinator_address ... (multi-process)]"


def main(argv: list[str]) -> int:
  if len(argv) != 3 or argv[1] != "verify":
    return command.error(USAGE)
  lines, corrupt = integrity.verify_all(argv[2], jax.process_index(), jax.process_count())
  if jax.process_index() == 0 and lines:
    print("\n".join(lines), flush=True)
  return 1 if corrupt else command.EXIT_OK


if __name__ == "__main__":
  # Exit 1 (corruption found) is an answer every process agreed on (verify_all gathers them).
  command.run(main, usage=USAGE, positional=2, bad_input=(FileNotFoundError,), agreed_codes=(0, 1))
