"""The loop runs ahead: metrics are fetched on log steps only, RUN_AHEAD steps after them."""

import jax

from configs import tiny
from train import loop, trainer


class _CountingJax:
  """The jax module as train/loop.py sees it, counting its device_get calls."""

  def __init__(self):
    self.fetches = 0

  def device_get(self, tree):
    self.fetches += 1
    return jax.device_get(tree)

  def __getattr__(self, name):
    return getattr(jax, name)


def test_metrics_are_fetched_on_log_steps_only_with_steps_queued_behind(
  tmp_path, cache_dir, monkeypatch
):
  config = tiny.get_config()
  config.data.cache_dir = cache_dir
  config.train.steps, config.log.every = 24, 8
  config.train.eval_every = config.checkpoint.every = 0  # at the end only
  config.log.progress = False
  counting = _CountingJax()
  monkeypatch.setattr(loop, "jax", counting)
  dispatched, handled = [], []
  dispatch, handle = loop._Loop.dispatch, loop._Loop.handle

  def record_dispatch(self, step_number):
    dispatched.append(step_number)
    return dispatch(self, step_number)

  def record_handle(self, step_number, *args):
    handled.append((step_number, dispatched[-1]))
    return handle(self, step_number, *args)

  monkeypatch.setattr(loop._Loop, "dispatch", record_dispatch)
  monkeypatch.setattr(loop._Loop, "handle", record_handle)
  report = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert dispatched == list(range(1, 25)) and report["steps"] == 24
  # Steps 8 and 16 are read once two more steps are queued; step 24 by the final flush.
  assert handled == [(8, 8 + loop.RUN_AHEAD), (16, 16 + loop.RUN_AHEAD), (24, 24)]
  # Two reads per log step (metrics, skip records), two per flush, one for the data offset:
  # a handful for 24 steps, where a read per step would be 24 or more.
  assert counting.fetches <= 3 * 2 + 2 * 2 + 1, counting.fetches
  assert report["train/loss"] < 6.0
