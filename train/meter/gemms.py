"""The fp8 and int8 matmuls of a compiled XLA program, read from its text.

``train.plan`` reports them for the compile-only devices it compiles for, and ``train.bench_gpu``
for the GPU it runs on: a Triton GEMM on fp8 operands has no custom call to name it, so they are
told by their operands' element types. Plain Python on the program's text (no TensorFlow, no
device), for the accelerator image the GPU suite runs in.
"""

from __future__ import annotations

import re
from typing import Any

_DEFINITION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \(?(pred|[bsuf]\d+|bf16|f8e\w+)\[")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")
_GEMM = re.compile(
  r"^\s*(?:ROOT )?%[\w.\-]+ = .*? (dot|convolution|custom-call)\(%([\w.\-]+), %([\w.\-]+)"
)
_CALLER = re.compile(r"(?:calls|to_apply)=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CUBLAS = re.compile(r'custom_call_target="(__cublas\$[^"]*)"')


def _low_format(a: str, b: str) -> str | None:
  """ "fp8" or "int8" for a matmul of element types ``a`` and ``b``, None for anything wider."""
  if a.startswith("f8") and b.startswith("f8"):
    return "fp8"
  if a in ("s8", "u8") and b in ("s8", "u8"):
    return "int8"
  return None


def low_precision_gemms(hlo: str) -> list[dict[str, Any]]:
  """The fp8 and int8 matmuls of a compiled program (the program's text, not the config's
  wish), one entry per distinct form with its ``count``: ``format`` ("fp8", "int8"),
  ``operands`` (their element types, "f8e4m3fn x f8e5m2"), ``kernel`` — a cuBLAS custom call
  ("__cublas$lt$matmul$f8"; "__cublas$lt$matmul" on int8), "triton" (a GEMM fusion XLA's GPU
  compiler emits with Triton) or XLA's own "dot"/"convolution" (TPUs) — and ``pass``
  ("backward" under a transpose, which takes in a rematerialised forward; else "forward"). A
  matmul inside a fused computation counts once per call of it; a loop's body (a scanned layer
  stack) once, as in ``collectives``."""
  lines = re.sub(r"/\*.*?\*/", "", hlo).splitlines()
  callers: dict[str, list[str]] = {}  # a computation -> the lines that call it
  for line in lines:
    for callee in _CALLER.findall(line):
      callers.setdefault(callee, []).append(line)
  found: dict[tuple, dict[str, Any]] = {}
  computation, dtypes = None, {}  # an instruction's element type, by name within a computation
  for line in lines:
    header = _COMPUTATION.match(line)
    if header:  # names repeat across computations (each fusion's "%param_0")
      computation, dtypes = header.group(1), {}
      continue
    definition = _DEFINITION.match(line)
    if definition:
      dtypes[definition.group(1)] = definition.group(2)
    gemm = _GEMM.match(line)
    if not gemm:
      continue
    op, a, b = gemm.groups()
    target = _CUBLAS.search(line)
    if op == "custom-call" and not target:
      continue  # not a matmul (cuDNN attention, a sharding annotation, ...)
    fmt = _low_format(dtypes.get(a, ""), dtypes.get(b, ""))
    if target and target.group(1).endswith("$f8"):
      fmt = "fp8"  # its operands may be bitcasts of the fp8 ones
    if fmt is None:
      continue
    sites = callers.get(computation) or [line]
    kernel = target.group(1) if target else op
    if computation in callers and "__triton" in sites[0]:
      kernel = "triton"
    for site in sites:
      name = _OP_NAME.search(site) or _OP_NAME.search(line)
      step = "backward" if name and "transpose(" in name.group(1) else "forward"
      operands = f"{dtypes.get(a, '?')} x {dtypes.get(b, '?')}"
      key = (fmt, kernel, step, operands)
      entry = found.setdefault(
        key, {"format": fmt, "kernel": kernel, "pass": step, "operands": operands, "count": 0}
      )
      entry["count"] += 1
  return sorted(found.values(), key=lambda g: (g["format"], g["pass"] != "forward", g["kernel"]))


def low_precision_counts(gemms: list[dict[str, Any]]) -> dict[str, int]:
  """How many fp8 and int8 matmuls ``low_precision_gemms`` found: {"fp8": n, "int8": m}."""
  return {fmt: sum(g["count"] for g in gemms if g["format"] == fmt) for fmt in ("fp8", "int8")}
