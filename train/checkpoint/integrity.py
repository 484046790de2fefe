"""Checkpoint integrity: a sha256 seal over every file of a finished save, checked before use.

Each finished save gets ``loom_checksums.json`` (size and sha256 of each file), written atomically
after Orbax has renamed the save into place. ``verify`` compares a step directory with its seal;
``verify_all`` checks every checkpoint of a run (``python -m train.checkpoint verify DIR``).
"""

from __future__ import annotations

import hashlib
import json
import os

CHECKSUMS = "loom_checksums.json"  # written into each step directory once its save is complete


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
  found = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != CHECKSUMS:
        found.append(rel)
  return sorted(found)


def seal(step_dir: str) -> None:
  """Records size and sha256 of every file of a complete checkpoint (atomically)."""
  table = {
    rel: {
      "bytes": os.path.getsize(os.path.join(step_dir, rel)),
      "sha256": _sha256(os.path.join(step_dir, rel)),
    }
    for rel in _files(step_dir)
  }
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(table, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify(step_dir: str) -> list[str]:
  """Problems found in a checkpoint directory (empty = it matches its checksums).

  A checkpoint that Orbax finished but that was never sealed (the process died in between) has no
  checksum file; it is reported as ``unsealed`` and is not treated as corrupt.
  """
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      table = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    return [f"{path}: unreadable checksum file ({e})"]
  problems = []
  for rel, expected in table.items():
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      problems.append(f"{full}: missing")
    elif os.path.getsize(full) != expected["bytes"]:
      problems.append(f"{full}: {os.path.getsize(full)} bytes, expected {expected['bytes']}")
    elif _sha256(full) != expected["sha256"]:
      problems.append(f"{full}: contents changed (sha256 mismatch)")
  extra = sorted(set(_files(step_dir)) - set(table))
  problems.extend(
    f"{os.path.join(step_dir, rel)}: not part of the saved checkpoint" for rel in extra
  )
  return problems


def is_sealed(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, CHECKSUMS))


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
    problems = verify(step_dir)
    if problems:
      corrupt += 1
      lines.append(f"step {step}: CORRUPT")
      lines.extend(f"  {problem}" for problem in problems)
    elif not is_sealed(step_dir):
      lines.append(f"step {step}: unsealed (complete, no checksums recorded)")
    else:
      lines.append(f"step {step}: ok")
  in_progress = [n for n in os.listdir(root) if "tmp" in n]
  lines.extend(f"ignored incomplete save: {os.path.join(root, n)}" for n in sorted(in_progress))
  return lines, corrupt
