"""``python -m train.checkpoint verify DIR``: check a run's checkpoints against their checksums.

DIR is a work directory or its ``checkpoints/`` folder. Prints one line per checkpoint (``ok``,
``unsealed`` = complete but saved by a process that died before recording checksums, or the
problems found) and exits 1 if any checkpoint is corrupt. Reads files only: no JAX, no restore.
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
  verify.add_argument("dir", help="work directory or its checkpoints/ folder")
  args = parser.parse_args(argv)
  try:
    lines, corrupt = integrity.verify_all(args.dir)
  except FileNotFoundError as e:
    print(f"loom: error: {e}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  return 1 if corrupt else 0


if __name__ == "__main__":
  sys.exit(main())
