"""``data.mixture`` and ``data.mixture_stages`` read and checked: the sources, their weights and
the stages (``mixture.py`` samples from them). Without TensorFlow: ``train/config.py`` validates a
config with it in commands that read no data (``train.plan``, ``train.convert``).
"""

from __future__ import annotations

import numpy as np

from input_pipeline import errors


def parse(mixture, stages) -> tuple[list[str], np.ndarray, list[tuple[int, np.ndarray]]]:
  """(source specs, stage start steps, [(start, normalised weights)]) from the config, checked."""
  if isinstance(mixture, str) or not all(
    isinstance(entry, list | tuple) and len(entry) == 2 for entry in mixture
  ):
    raise errors.DataError(
      f"data.mixture={mixture!r} must be pairs (source, weight), e.g. "
      f"(('stdlib', 0.7), ('files:/data/*.py', 0.3))"
    )
  specs = [str(spec) for spec, _ in mixture]
  if len(specs) < 2 or len(set(specs)) != len(specs):
    raise errors.DataError(
      f"data.mixture needs two or more distinct sources, got {specs}; for one source use "
      f"data.source"
    )
  table = [(0, _weights([w for _, w in mixture], "data.mixture", len(specs)))]
  for entry in stages:
    if not isinstance(entry, list | tuple) or len(entry) != 2:
      raise errors.DataError(
        f"data.mixture_stages entry {entry!r} must be (start step, (w1, ..., w{len(specs)}))"
      )
    start, weights = entry
    if not isinstance(start, int) or start <= table[-1][0]:
      raise errors.DataError(
        f"data.mixture_stages: start step {start!r} must be an integer after the previous stage "
        f"({table[-1][0]}); stages are listed in order"
      )
    table.append((start, _weights(weights, f"data.mixture_stages at step {start}", len(specs))))
  return specs, np.array([start for start, _ in table], np.int64), table


def _weights(weights, where: str, count: int) -> np.ndarray:
  values = np.asarray(weights, np.float64)
  if values.shape != (count,) or not np.all(np.isfinite(values)) or np.any(values < 0):
    raise errors.DataError(f"{where}: weights {weights!r} must be {count} numbers >= 0")
  if values.sum() <= 0:
    raise errors.DataError(f"{where}: weights {weights!r} sum to 0; give some source a weight")
  return values / values.sum()
