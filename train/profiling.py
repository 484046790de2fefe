"""Profiles on request: a ``jax.profiler`` trace of chosen train steps, viewable in TensorBoard's
profile plugin or Perfetto (``*.trace.json.gz`` beside the ``*.xplane.pb``).

``log.profile_steps = (start, stop)`` traces steps start..stop of a run into ``WORKDIR/profile``;
``python -m train.bench --profile DIR`` traces the benchmark's timed steps. Each step is a
``StepTraceAnnotation`` named "train" with its step number, so the viewers split the trace by step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import jax

from input_pipeline.host import storage

log = logging.getLogger("loom")


class StepProfiler:
  """Traces steps ``start`` .. ``stop`` (inclusive) into ``directory``; off when start is None."""

  def __init__(self, directory, start: int | None, stop: int | None):
    self.directory, self.start, self.stop = directory, start, stop
    self.active = False
    self._mirror = None  # the profiler writes local files only; a remote directory gets a copy

  def _trace_dir(self) -> str:
    if storage.is_remote(self.directory):
      self._mirror = storage.LocalMirror(self.directory, prefix="loom-profile-")
      return str(self._mirror.local)
    return str(self.directory)

  @contextlib.contextmanager
  def step(self, step_number: int, result: Any = None) -> Iterator[None]:
    """Wraps the dispatch of one step; ``result()`` gives what to wait for before stopping."""
    if self.start is not None and step_number == self.start and not self.active:
      jax.profiler.start_trace(self._trace_dir(), create_perfetto_trace=True)
      self.active = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step_number):
      yield
    if self.active and step_number >= self.stop:
      self.close(result() if callable(result) else result)

  def close(self, wait_for: Any = None) -> None:
    """Stops a trace in progress (after ``wait_for`` is ready: the traced steps must finish)."""
    if not self.active:
      return
    jax.block_until_ready(wait_for)
    jax.profiler.stop_trace()
    self.active = False
    if self._mirror is not None:
      self._mirror.sync()
    log.info("profile of steps %d-%d written to %s", self.start, self.stop, self.directory)
