"""One validation before any work, one-line errors for bad input, and the layout's promises."""

import ast
import json
import logging
import os
import subprocess
import sys

import jax
import optax
import pytest
from cli_helpers import REPO, copy_run, run_train
from jax.sharding import PartitionSpec

from configs import default, tiny
from train import config as config_lib
from train import planning
from train import state as state_lib
from train.cluster import mesh as mesh_lib
from train.inference import engine as engine_lib
from train.meter import hardware


def _one_line_error(result) -> str:
  """The single 'loom: error:' line of a refused run (and no traceback)."""
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("loom: error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config=configs/nope.py"], "configs/nope.py"),
    (["--config.train.stepz=3"], "unknown config key 'stepz'"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--coordinator_address=127.0.0.1:1234"], "multi-process settings are incomplete"),
    (["--coordinator_address=nohost", "--num_processes=2", "--process_id=0"], "HOST:PORT"),
  ],
)
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, args, message):
  """Exit 2, one line naming the key or path; no data prepared, nothing in the work directory.
  (Bad values the config check refuses: tests/test_cli.py, by the same train_and_evaluate.)"""
  cache = tmp_path / "cache"
  workdir = tmp_path / "w"
  config = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  rest = [a for a in args if not a.startswith("--config=")]
  kwargs = {"config": config} if config else {}
  result = run_train(str(workdir), *rest, cache_dir=str(cache), **kwargs)
  assert message in _one_line_error(result)
  assert not cache.exists(), "data was prepared before the config was checked"
  assert not workdir.exists(), "a refused run wrote into its work directory"


@pytest.mark.slow
def test_a_refused_resume_leaves_the_work_directory_as_it_was(tiny_run, tmp_path, cache_dir):
  workdir = copy_run(tiny_run[0], tmp_path / "w")
  before = {
    name: open(os.path.join(workdir, name), "rb").read()
    for name in ("config.json", "metrics.jsonl", "report.json")
  }
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  listing = sorted(os.listdir(workdir))
  local = tmp_path / "local"  # asked for a local tier too: nothing of it is made either
  result = run_train(
    workdir,
    "--config.train.steps=30",
    "--config.model.qk_norm=True",
    f"--config.checkpoint.local_dir={local}",
    cache_dir=cache_dir,
  )
  assert "model.qk_norm=False in the checkpoint, True now" in _one_line_error(result)
  assert "allow_mismatch" in result.stderr
  for name, content in before.items():
    assert open(os.path.join(workdir, name), "rb").read() == content, name
  assert json.loads(before["config.json"])["model"]["qk_norm"] is False
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints
  assert sorted(os.listdir(workdir)) == listing and not local.exists()


def test_a_finished_run_started_again_keeps_what_it_wrote(tiny_run, tmp_path, cache_dir, caplog):
  """Nothing to train (its last step is saved): the run's report (its meter), config and
  metrics stay as the run wrote them, whatever the new start's settings."""
  from cli_helpers import train_in_process

  workdir = copy_run(tiny_run[0], tmp_path / "w")
  names = ("config.json", "metrics.jsonl", "report.json")
  before = {name: open(os.path.join(workdir, name), "rb").read() for name in names}
  report = train_in_process(workdir, cache_dir, {"optim.learning_rate": 0.5})
  assert report["restarted_from_step"] == 20
  for name, content in before.items():
    assert open(os.path.join(workdir, name), "rb").read() == content, name
  # A report of a preempted attempt covers part of the run: not kept as the final one.
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump({"preempted": True, "tokens": 1}, f)
  train_in_process(workdir, cache_dir)
  with open(os.path.join(workdir, "report.json")) as f:
    assert json.load(f)["preempted"] is False
  # Raising train.steps trains on, and says that the decay now spans the new count.
  with caplog.at_level(logging.WARNING, logger="loom"):
    report = train_in_process(workdir, cache_dir, {"train.steps": 22})
  assert report["restarted_from_step"] == 20 and report["steps"] == 22
  assert "train.steps=20 in the checkpoint, 22 now: the learning rate" in caplog.text


def test_validate_names_each_bad_key(tmp_path):
  devices = jax.devices()
  cases = {
    "optim.b2": 1.0,
    "optim.min_lr_ratio": 1.5,
    "meter.pue": 0.5,
    "log.sample_tokens": -1,
    "data.validation_percent": 100,
    "train.microbatches": 0,
    "checkpoint.local_dir": "gs://bucket/local",  # the object store is the persistent tier
    "checkpoint.local_replicas": 2,
    "checkpoint.local_keep": 0,
    # An empty sample prompt had crashed the first eval, before the save at the same step.
    "log.sample_prompt": "",
    # Each of these had trained on NaN from step 1 (or inf updates), ending in a DivergenceError
    # that advised a lower learning rate.
    "model.norm_eps": -1.0,
    "model.rope_theta": 0.0,
    "model.param_dtype": "float16",  # refused for a run that trains (it has a workdir)
  }
  for key, value in cases.items():
    config = tiny.get_config()
    group, name = key.split(".")
    config[group][name] = value
    with pytest.raises(config_lib.ConfigError, match=f"{key}={value!r}"):
      config_lib.validate(config, devices=devices, workdir=str(tmp_path / "w"))
  config.model.param_dtype = "float16"  # an import or inference holds float16 weights
  config_lib.validate(config, devices=devices)
  config = tiny.get_config()
  config.model.vocab_size = 100
  with pytest.raises(config_lib.ConfigError, match="model.vocab_size=100 is smaller than .* 258"):
    config_lib.validate(config, devices=devices)
  config = tiny.get_config()
  config.model.lora_rank, config.model.lora_targets = 4, ("q", "gate")
  config.model.mlp = "gelu"
  with pytest.raises(config_lib.ConfigError, match="'gate' is a kernel of the swiglu MLP"):
    config_lib.validate(config, devices=devices, workdir=str(tmp_path / "w"))
  config.model.lora_targets, config.model.lora_alpha = ("q",), 0.0
  with pytest.raises(config_lib.ConfigError, match="model.lora_alpha=0.0 must be > 0"):
    config_lib.validate(config, devices=devices, workdir=str(tmp_path / "w"))
  # A key a config file adds (ml_collections lets it) was ignored: the default was trained with.
  config = tiny.get_config()
  config.train.spike_policy, config.checkpoint.every = "rollback", 0  # had become "skip"
  with pytest.raises(config_lib.ConfigError, match=r"spike_policy='rollback' .*every=0 saves"):
    config_lib.validate(config, devices=devices)
  config = tiny.get_config()
  config.data.mixture_stages = ((5, (1.0,)),)  # without a mixture: it had been ignored
  with pytest.raises(config_lib.ConfigError, match=r"data.mixture_stages=.* but data.mixture"):
    config_lib.validate(config, devices=devices)
  config = tiny.get_config()
  config.optim.lr = 1e-4
  with pytest.raises(config_lib.ConfigError, match=r"optim.lr is not a config key .*learning_rate"):
    config_lib.validate(config, devices=devices)
  config = tiny.get_config()
  config.train.stpes = 10
  with pytest.raises(
    config_lib.ConfigError, match=r"train.stpes is not a config key \(did you mean train.steps\?"
  ):
    config_lib.validate(config, devices=devices)


def test_the_model_vocabulary_is_known_without_preparing_data(tmp_path):
  config = default.get_config()
  config.data.tokenizer = "sentencepiece"
  config.data.spm_vocab_size = 1000
  config.data.cache_dir = str(tmp_path / "cache")
  assert config_lib.model_config(config).vocab_size == 1000
  assert not (tmp_path / "cache").exists()


def test_parameter_shapes_the_mesh_cannot_split_are_refused():
  config = tiny.get_config()
  config.mesh.fsdp, config.mesh.tensor = 4, 2
  config.model.mlp_dim = 33  # the MLP kernels' "mlp" axis is split over tensor=2
  with pytest.raises(config_lib.ConfigError, match=r"dimension 1 \(size 33\) cannot be split 2"):
    config_lib.validate(config, devices=jax.devices())


def test_a_workdir_that_is_a_file_is_refused_and_nothing_is_created(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(config_lib.ConfigError, match="is a file, not a directory"):
    config_lib.check_workdir(str(a_file))
  with pytest.raises(config_lib.ConfigError, match="cannot be created"):
    config_lib.check_workdir(str(a_file / "below"))
  assert config_lib.check_workdir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
  assert not (tmp_path / "new").exists()


def test_one_rule_resolver_for_parameters_activations_and_the_cache():
  """Rules that would put one mesh axis on two dimensions are resolved the same way everywhere:
  the first dimension takes the axis, the later one is replicated."""
  config = tiny.get_config()
  kept = tuple(r for r in config.mesh.rules if r[0] not in ("kv_heads", "head_dim"))
  config.mesh.rules = kept + (("kv_heads", "fsdp"), ("head_dim", "fsdp"))
  config.mesh.data, config.mesh.fsdp = 4, 2  # tiny has 2 kv heads
  resolved = config_lib.validate(config, devices=jax.devices())
  mesh, rules, model_cfg = resolved.mesh, resolved.rules, resolved.model_cfg
  assert mesh_lib.partition_spec(("kv_heads", "head_dim"), rules) == PartitionSpec("fsdp", None)
  spec = state_lib.state_spec(model_cfg, optax.identity(), mesh, rules)
  # A parameter [layers, embed, kv_heads, head_dim]: layers take the stage axis (of size 1
  # here), embed takes fsdp, the rest replicate.
  key_kernel = spec.abstract["params"]["blocks"]["attn"]["k_kernel"]
  assert key_kernel.sharding.spec == PartitionSpec("stage", "fsdp", None, None)
  # The inference cache [layers, batch, length, kv_heads, head_dim]: batch takes fsdp first.
  engine = engine_lib.Engine(spec.graphdef, model_cfg, mesh, rules)
  batch = ("data", "fsdp", "expert")
  assert engine.cache_sharding.spec == PartitionSpec("stage", batch, None, None, None)


def test_the_hardware_table_is_the_one_source_for_mfu_energy_and_plans():
  class Device:
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

  assert hardware.datasheet_peak(Device(), "bfloat16") == 989e12
  assert hardware.lookup("TPU v5 lite").name == "TPU v5e"
  assert hardware.lookup("NVIDIA H100 PCIe").peak_flops["bfloat16"] == 756e12
  # A name is matched where its word ends: an L40S is not an L4 (a third of its peak).
  assert hardware.lookup("NVIDIA L40S").name == "NVIDIA L40S"
  assert hardware.lookup("NVIDIA L4").name == "NVIDIA L4"
  assert hardware.lookup("NVIDIA H100 NVL").peak_flops["bfloat16"] == 835e12
  assert hardware.lookup("NVIDIA A100-SXM4-80GB").name == "NVIDIA A100 SXM"

  class Cpu:
    platform, device_kind = "cpu", "cpu"

  assert hardware.datasheet_peak(Cpu(), "float32") is None
  config = default.get_config()
  config.model.dtype = "bfloat16"
  result = planning.plan(config, hardware.parse("v5e-16"), use_compiler=False)
  v5e = hardware.lookup("TPU v5 lite")
  assert result["peak_flops_per_chip"] == v5e.peak_flops["bfloat16"] == 197e12
  assert result["power_watts_per_chip"] == v5e.power_watts
  assert result["hbm_per_chip_bytes"] == v5e.hbm_bytes


COMMANDS = {"train.generate", "train.bench", "train.plan", "train.report", "train.__main__"}


def test_no_library_module_imports_a_command():
  root = os.path.join(REPO, "train")
  for folder, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
      if module in COMMANDS or module.endswith("__main__"):
        continue
      tree = ast.parse(open(path).read())
      imported = set()
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
          imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
      assert not imported & COMMANDS, f"{module} imports {imported & COMMANDS}"


def test_the_checkpoint_command_has_its_new_name(tmp_path):
  result = subprocess.run(
    [sys.executable, "-m", "train.checkpoint", "verify", str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 2 and "no checkpoints under" in result.stderr


def test_measured_xla_cpu_defaults_are_set_unless_the_user_set_them():
  from input_pipeline.host import settings

  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert settings.xla_flags(env) == ["--xla_cpu_experimental_ynn_fusion_type=dot"]
  assert env["XLA_FLAGS"].split() == [
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
  ]
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise"}
  assert settings.xla_flags(mine) == [] and mine["XLA_FLAGS"].endswith("dot,eltwise")
  # In a fresh process that applies the settings as every entry point does: the dot goes to
  # YNNPACK, the GELU after it stays an XLA loop fusion (with XLA's own default both would be one
  # YNNPACK fusion).
  code = (
    "from input_pipeline.host import settings; settings.apply()\n"
    "import jax, jax.numpy as jnp, re\n"
    "f = jax.jit(lambda x, w: jax.nn.gelu(x @ w, approximate=True) * 2.0 + x.sum())\n"
    "hlo = f.lower(jnp.ones((64, 32)), jnp.ones((32, 32))).compile().as_text()\n"
    "print(sorted(set(re.findall(r'(\\w+_fusion)(?:\\.\\d+)? = ', hlo))))\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
    [sys.executable, "-c", code],
    cwd=REPO,
    env=dict(env, JAX_PLATFORMS="cpu"),
    text=True,
    capture_output=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  fusions = ast.literal_eval(out.stdout.splitlines()[-1])
  assert "ynn_fusion" in fusions and len(fusions) > 1, fusions


def test_init_from_a_run_with_a_sentencepiece_file_takes_that_file(tmp_path):
  """A source trained with data.spm_model: the new run had trained a tokenizer of its own on its
  data (the weights were given other ids), and a config naming another file was not refused."""
  import jax.numpy as jnp

  from train import init_from
  from train.checkpoint import manager

  source = tiny.get_config()
  source.data.tokenizer, source.data.spm_model = "sentencepiece", "/models/a.model"
  model_cfg = config_lib.model_config(tiny.get_config()).to_dict()  # its shapes: any will do
  ckpt = manager.Checkpointer(
    str(tmp_path / "src" / "checkpoints"), max_to_keep=1, async_save=False
  )
  metadata = {"config": source.to_dict(), "model_config": model_cfg, "data_fingerprint": "f"}
  ckpt.save(1, {"w": jnp.ones(2)}, metadata)
  ckpt.close()
  config = tiny.get_config()
  config.checkpoint.init_from = f"loom:{tmp_path / 'src'}"
  adopted = init_from.adopt(config)
  assert (adopted.data.tokenizer, adopted.data.spm_model) == ("sentencepiece", "/models/a.model")
  config.data.tokenizer, config.data.spm_model = "sentencepiece", "/models/b.model"
  with pytest.raises(config_lib.ConfigError, match="data.spm_model='/models/b.model' in the con"):
    init_from.adopt(config)
