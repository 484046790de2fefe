"""``python -m train.checkpoint verify DIR``: check a run's checkpoints against their checksums.

DIR is a work directory or its ``checkpoints/`` folder. Prints one line per checkpoint (``ok``,
``unsealed`` = complete but saved by a process that died before recording checksums, or the
problems found) and exits 1 if any checkpoint is corrupt. Reads files only: no restore. With
``--coordinator_address/--num_processes/--process_id`` (as ``python -m train``) the processes
share the checks and process 0 prints the result.
"""

from __future__ import annotations

import argparse
import sys

from train.checkpoint import integrity


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m train.checkpoint", description=__doc__.split("\n")[0]
  )
  sub = parser.add_subparsers(dest="command", required=True)
  verify = sub.add_parser("verify", help="check checkpoints against their checksums")
  verify.add_argument("dir", help="work directory or its checkpoints/ folder (local or gs://)")
  verify.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-process)")
  verify.add_argument("--num_processes", type=int, help="processes sharing the check")
  verify.add_argument("--process_id", type=int, help="this process's index")
  args = parser.parse_args(argv)
  process, count, started = 0, 1, False
  if args.coordinator_address or args.num_processes or args.process_id is not None:
    import jax

    from train.cluster import distributed

    try:
      started = distributed.initialize(
        args.coordinator_address, args.num_processes, args.process_id
      )
    except ValueError as e:
      print(f"loom: error: {e}", file=sys.stderr)
      return 2
    process, count = jax.process_index(), jax.process_count()
  agreed = True  # every process reached the same answer (gathered in verify_all)
  try:
    lines, corrupt = integrity.verify_all(args.dir, process, count)
    code = 1 if corrupt else 0
  except FileNotFoundError as e:
    lines, code, agreed = [], 2, False
    print(f"loom: error: {e}", file=sys.stderr)
  if process == 0 and lines:
    print("\n".join(lines), flush=True)
  if started:
    from train.cluster import distributed

    distributed.end(True, code, orderly=agreed)
  return code


if __name__ == "__main__":
  sys.exit(main())
