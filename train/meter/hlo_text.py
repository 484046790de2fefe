"""What a compiled XLA program holds, read from its text: the collectives by kind (how many, the
bytes of their results on one device), the splash attention kernels of a TPU program, the cuDNN
fused-attention calls of a GPU program, and whether an MoE step exchanges tokens between experts.
``train.plan`` reports them for the compile-only devices it compiles for
(``train/planning.py``); ``train/meter/gemms.py`` reads the low-precision matmuls the same way.
"""

from __future__ import annotations

import math
import re
from typing import Any

_COLLECTIVE = re.compile(
  r"= (\(.*?\)|\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
  r"(-start)?\("
)
_ARRAY = re.compile(r"\b(pred|[bsuf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_BITS = {"pred": 8, "bf16": 16}


def _array_bytes(shape: str) -> int:
  """Bytes of the arrays in an HLO shape string ("bf16[8,64]{1,0}" or a tuple of them)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    bits = _BITS.get(dtype) or int(re.sub(r"\D", "", dtype.split("e")[0]) or 8)
    total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
  return total


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of an HLO tuple shape "(a, (b, c))" -> ["a", "(b, c)"]."""
  inner, depth, parts, current = shape[1:-1], 0, [], ""
  for char in inner:
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
    if char == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += char
  return [*parts, current]


def collectives(hlo: str) -> dict[str, dict[str, int]]:
  """The collectives of a compiled program, by kind: how many and the bytes of their results on
  one device, as written in the program's text. A loop's body (a scanned layer stack) is counted
  once, though it runs once per iteration. An asynchronous ``-start`` (but all-reduce's) returns
  (operands, outputs): its outputs are counted."""
  found: dict[str, dict[str, int]] = {}
  for shape, kind, start in _COLLECTIVE.findall(re.sub(r"/\*.*?\*/", "", hlo)):
    if start and kind != "all-reduce" and shape.startswith("("):
      elements = _tuple_elements(shape)
      shape = elements[1] if len(elements) > 1 else shape
    entry = found.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += _array_bytes(shape)
  return found


_TPU_KERNEL = re.compile(
  r"^\s*(?:ROOT )?%(\w+?)(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\""
)


def splash_kernels(hlo: str) -> list[str]:
  """The splash attention kernels (Pallas, Mosaic custom calls) in a compiled TPU program, by
  name: "splash_mha_fwd_segmented_residuals", "splash_mha_dq_...", "splash_mha_dkv_..."."""
  names = {m.group(1) for m in map(_TPU_KERNEL.match, hlo.splitlines()) if m}
  return sorted(name for name in names if name.startswith("splash_"))


def cudnn_attention_calls(hlo: str) -> list[dict[str, Any]]:
  """The cuDNN fused-attention custom calls in a compiled GPU program, one entry per distinct
  form: ``target`` ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", ...: the kernel the
  compiler kept, not the config's wish), ``mask_type`` ("CAUSAL"; "PADDING_CAUSAL" for packed
  rows) and ``ragged_offsets``, the shape of one device's packed-row offsets operand
  ("s32[2,65]": its 2 rows, 64 runs each), or None without packed rows; ``heads``, the query and
  key heads of its operands (equal for packed rows: models/attention.py repeats grouped keys)."""
  found = {}
  for line in hlo.splitlines():
    target = re.search(r'custom_call_target="(__cudnn\$fmha[^"]*)"', line)
    if not target:
      continue
    mask = re.search(r'"mask_type": ?"(\w+)"', line)
    operands = re.search(r"operand_layout_constraints=\{(.*?)\}, api_version", line)
    ints = re.findall(r"s32\[[\d,]+\]", operands.group(1)) if operands else []
    floats = re.findall(r"(?:bf16|f16|f32)\[([\d,]+)\]", operands.group(1)) if operands else []
    shapes = [[int(n) for n in shape.split(",")] for shape in floats[:2]]  # query, key: BTNH
    call = {
      "target": target.group(1),
      "mask_type": mask.group(1) if mask else None,
      # Lengths, then offsets (one more column: where each run starts; -1 until JAX sets it).
      "ragged_offsets": ints[-1] if len(ints) == 4 else None,
      "heads": tuple(shape[2] for shape in shapes) if len(shapes) == 2 else None,
    }
    found[tuple(call.values())] = call
  return sorted(found.values(), key=lambda call: call["target"])


def has_expert_exchange(hlo: str) -> bool:
  """Whether a compiled program holds the experts' all-to-all: one traced from
  ``jax.lax.all_to_all`` inside ``shard_map`` (the compiler adds all-to-alls of its own, e.g. for
  the embedding's gather, which a dense model has too)."""
  return any("all-to-all" in line and "shard_map/all_to_all" in line for line in hlo.splitlines())
