"""``python -m train.ckpt verify DIR``: check a run's checkpoints offline against their checksums.

DIR is a work directory or its ``checkpoints/`` folder. Prints one line per checkpoint (``ok``,
``unsealed`` = complete but saved by a process that died before recording checksums, or the
problems found) and exits 1 if any checkpoint is corrupt. Reads files only: no JAX, no restore.
"""

from __future__ import annotations

import argparse
import os
import sys

from train import checkpointing


def checkpoint_root(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory; pass a work directory or its checkpoints/")
  nested = os.path.join(path, "checkpoints")
  return nested if os.path.isdir(nested) else path


def step_dirs(root: str) -> list[tuple[int, str]]:
  """Complete step directories (Orbax's in-progress saves carry a tmp suffix and are skipped)."""
  steps = [(int(name), os.path.join(root, name)) for name in os.listdir(root) if name.isdigit()]
  return sorted(steps)


def verify_all(path: str) -> tuple[list[str], int]:
  root = checkpoint_root(path)
  lines, corrupt = [], 0
  steps = step_dirs(root)
  if not steps:
    raise FileNotFoundError(f"no checkpoints under {root}")
  for step, step_dir in steps:
    problems = checkpointing.verify(step_dir)
    if problems:
      corrupt += 1
      lines.append(f"step {step}: CORRUPT")
      lines.extend(f"  {problem}" for problem in problems)
    elif not checkpointing.is_sealed(step_dir):
      lines.append(f"step {step}: unsealed (complete, no checksums recorded)")
    else:
      lines.append(f"step {step}: ok")
  in_progress = [n for n in os.listdir(root) if "tmp" in n]
  lines.extend(f"ignored incomplete save: {os.path.join(root, n)}" for n in sorted(in_progress))
  return lines, corrupt


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.ckpt", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  verify = sub.add_parser("verify", help="check checkpoints against their checksums")
  verify.add_argument("dir", help="work directory or its checkpoints/ folder")
  args = parser.parse_args(argv)
  try:
    lines, corrupt = verify_all(args.dir)
  except FileNotFoundError as e:
    print(f"loom: error: {e}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  return 1 if corrupt else 0


if __name__ == "__main__":
  sys.exit(main())
