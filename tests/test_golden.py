"""Golden one-step metrics of the tiny config on real data: catches silent numeric changes."""

import numpy as np

import input_pipeline
from configs import tiny
from train import state as state_lib
from train import trainer

# Update these only when a change is meant to alter the numbers (model init, data, loss, optimizer);
# say why in the commit message.
GOLDEN = {"train/loss": 5.4152212, "train/grad_norm": 1.7324585, "train/tokens": 256.0}


def test_first_step_matches_golden_metrics(tmp_path):
  config = tiny.get_config()
  config.data.cache_dir = str(tmp_path / "cache")
  run = trainer.setup(config, str(tmp_path / "w"))
  state = state_lib.init_state(run.spec, run.model_cfg, run.tx, run.mesh, run.rules, config.seed)
  batches = run.pipeline.train_batches(
    global_batch_size=config.train.batch_size, start_step=0, process_index=0, process_count=1
  )
  batch = input_pipeline.to_global(next(batches), run.batch_sharding)
  _, metrics = run.compiled_step(state, batch)
  got = {key: float(metrics[key]) for key in GOLDEN}
  print(got)
  for key, expected in GOLDEN.items():
    np.testing.assert_allclose(
      got[key],
      expected,
      rtol=1e-5,
      err_msg=f"{key} changed: update GOLDEN only if the change was intended (got {got})",
    )
