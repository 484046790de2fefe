"""train.plan: TPU slice names, the analytic model, and ahead-of-time compilation for a pod."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from train import config as config_lib
from train import plan as plan_cli
from train import planning as plan_lib
from train.cluster import mesh as mesh_lib
from train.cluster import tpu_slice
from train.meter import hardware as topology_lib
from train.meter import hlo_text
from train.programs import jit_programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "name, chips, libtpu_name",
  [
    ("v5p-128", 64, "v5p:4x4x4"),
    ("v4-32", 16, "v4:2x2x4"),
    ("v5e-256", 256, "v5e:16x16"),
    ("v5litepod-16", 16, "v5e:4x4"),
    ("v6e-256", 256, "v6e:16x16"),
    ("v6e-8", 8, "v6e:2x4"),
  ],
)
def test_slice_names(name, chips, libtpu_name):
  topology = topology_lib.parse(name)
  assert topology.chips == chips
  assert topology.libtpu_name == libtpu_name


@pytest.mark.parametrize(
  "name, listed",
  [("v9-8", "v5p-128, "), ("h100", "v6e-256"), ("v5p-100", "v5p-128"), ("v5p-7", "v5p-8")],
)
def test_wrong_names_list_the_valid_ones(name, listed):
  with pytest.raises(ValueError, match=f"unknown TPU topology '{name}'.*{listed}"):
    topology_lib.parse(name)


def llama_8b():
  from configs import llama_8b as config_file

  return config_file.get_config()


def test_analytic_plan_is_self_consistent():
  config = llama_8b()
  topology = topology_lib.parse("v5p-128")
  result = plan_lib.plan(config, topology, tokens=10**9, mfu=0.5, use_compiler=False)
  assert result["method"] == "analytic" and "analytic estimate only" in result["note"]
  tokens_per_step = 256 * 8192
  assert result["steps"] == math.ceil(10**9 / tokens_per_step)
  expected_step = result["flops_per_step"] / (64 * 459e12 * 0.5)
  assert result["step_time_s"] == pytest.approx(expected_step)
  assert result["time_to_train_s"] == pytest.approx(result["steps"] * expected_step)
  hours = result["time_to_train_s"] / 3600
  assert result["energy_kwh"] == pytest.approx(64 * 300 * hours / 1000 * config.meter.pue)
  # 8B params × (4 bytes + Adam's 8) over 64 chips is a floor for the state alone.
  assert result["memory_per_chip_bytes"] > 8.0e9 * 12 / 64
  # A failure costs half a save interval plus the restore; the local tier makes it small.
  losses = result["checkpoints"]
  per_host = losses["state_bytes_per_host"]
  assert per_host == 4 * result["analytic_memory_per_chip_bytes"]["state"]  # 4 chips per host
  persistent = losses["persistent"]
  assert persistent["expected_loss_per_failure_s"] == pytest.approx(
    500 * expected_step / 2 + per_host / plan_lib.DEFAULT_SAVE_RATES["persistent"]
  )
  assert "local" not in losses
  config.checkpoint.local_dir, config.checkpoint.local_every = "/dev/shm/loom", 20
  rates = {"local": 2e9, "persistent": 1e8}
  both = plan_lib.plan(config, topology, use_compiler=False, save_rates=rates)["checkpoints"]
  assert both["local"]["save_s"] == pytest.approx(per_host / 2e9)
  assert both["local"]["expected_loss_per_failure_s"] == pytest.approx(
    20 * both["local"]["interval_s"] / 20 / 2 + per_host / 2e9
  )
  local_loss = both["local"]["expected_loss_per_failure_s"]
  assert local_loss < both["persistent"]["expected_loss_per_failure_s"] / 10
  # With the splash kernel and the chunked loss (the config's) it fits; at 2M tokens a step (4
  # rows of 8192 per chip) the fp32 logits and attention scores alone overflow a chip.
  assert result["fits"] is True
  config.model.attention, config.train.loss_chunk = "xla", 0
  assert plan_lib.plan(config, topology, use_compiler=False)["fits"] is False
  # A shorter, smaller batch fits even so.
  config.data.seq_len, config.train.batch_size = 2048, 64
  shorter = plan_lib.plan(config, topology, use_compiler=False)
  assert shorter["fits"] is True
  # The same model on four v5e chips cannot hold even its optimizer state.
  small = plan_lib.plan(config, topology_lib.parse("v5e-4"), use_compiler=False)
  assert small["fits"] is False and small["memory_per_chip_bytes"] > 16 * 1024**3


def test_a_pipelined_plan_trains_for_as_long_as_its_bubble_makes_it():
  """Time to train, chip-hours, energy and the checkpoint intervals had used the step without
  the pipeline's idle ticks: llama_70b's 1/9 bubble made them 11% short."""
  from configs import llama_70b

  config = llama_70b.get_config()
  result = plan_lib.plan(
    config, topology_lib.parse("v5p-128", num_slices=2), tokens=10**9, use_compiler=False
  )
  schedule = result["pipeline"]
  assert schedule["bubble"] == pytest.approx(1 / 9, abs=1e-4)
  with_bubble = result["step_time_s"] / (1 - schedule["bubble"])
  assert schedule["step_time_with_bubble_s"] == pytest.approx(with_bubble)
  assert with_bubble == pytest.approx(result["step_time_s"] * 9 / 8, rel=1e-3)
  assert result["time_to_train_s"] == pytest.approx(result["steps"] * with_bubble)
  assert result["tokens_per_second"] == pytest.approx(result["tokens_per_step"] / with_bubble)
  hours = result["time_to_train_s"] / 3600
  assert result["energy_kwh"] == pytest.approx(
    result["chips"] * 300 * hours / 1000 * config.meter.pue
  )
  assert schedule["mfu_with_bubble"] == pytest.approx(0.4 * 8 / 9, rel=1e-3)


def test_out_of_memory_message_is_read():
  message = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 40.25G of 15.75G hbm."
  assert plan_lib._out_of_memory_bytes(message) == int(40.25 * 1024**3)
  assert plan_lib._out_of_memory_bytes("some other error") is None
  # Newer libtpu names the temporaries alone; the program's arguments come on top.
  message = (
    "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
    "temporaries (125.01G) exceeds available HBM (95.74G)."
  )
  assert plan_lib._out_of_memory_bytes(message, 7) == int(125.01 * 1024**3) + 7


def test_the_experts_exchange_is_told_from_the_compilers_own_all_to_alls():
  # HLO lines as compiled for v5p (shortened): a dense model's embedding gather gets one too.
  gather = (
    "%all-to-all.1 = bf16[8,64,32]{2,1,0} all-to-all(%fusion.2), dimensions={0}, "
    'metadata={op_name="jit(train_step)/jvp(jit(_take))/gather"}'
  )
  exchange = (
    "%all-to-all.7 = bf16[8,32,256]{2,1,0} all-to-all(%fusion.9), dimensions={0}, "
    'metadata={op_name="jit(train_step)/jvp()/while/body/closed_call/shard_map/all_to_all"}'
  )
  assert not hlo_text.has_expert_exchange(gather)
  assert hlo_text.has_expert_exchange(f"{gather}\n{exchange}")


def run_plan(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "train.plan", *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_prints_one_json_object_last_and_rejects_bad_names():
  result = run_plan(
    "--config=configs/llama_8b.py", "--hardware=v5e-256", "--tokens=1000000000", "--analytic"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  last = json.loads(result.stdout.strip().splitlines()[-1])
  for key in (
    "topology",
    "fits",
    "memory_per_chip_bytes",
    "hbm_per_chip_bytes",
    "flops_per_step",
    "step_time_s",
    "time_to_train_s",
    "energy_kwh",
  ):
    assert key in last, key
  assert last["topology"] == "v5e-256" and last["tokens"] == 10**9
  bad = run_plan("--config=configs/llama_8b.py", "--topology=v5p-100", "--analytic")
  assert bad.returncode == 2
  assert "valid v5p slices: v5p-8, v5p-16" in bad.stderr
  fp8 = run_plan(
    "--config=configs/llama_8b.py", "--hardware=v5e-256", "--analytic", "--config.model.quant=fp8"
  )
  assert fp8.returncode == 2
  assert "model.quant='fp8': TPU v5e has no fp8 matmul units" in fp8.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
  "changes, message",
  [
    ({"model.moe.num_experts": 6, "mesh.expert": 4}, "num_experts=6 is not divisible by 4"),
    ({"mesh.tensor": 8}, "model.num_heads=4 is not divisible by 8"),
  ],
)
def test_an_analytic_plan_refuses_what_a_run_would(changes, message):
  """No devices to compile for (--analytic, or no libtpu or CUDA plugin): the layout checks
  run on the mesh's sizes all the same."""
  from configs import tiny

  config = tiny.get_config()
  for key, value in changes.items():
    *groups, name = key.split(".")
    target = config
    for group in groups:
      target = target[group]
    target[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    plan_lib.plan(config, topology_lib.parse("h100:8"), use_compiler=False)


def test_a_plan_checks_the_attention_for_the_chips_it_plans():
  """The layout checks take the planned chips' attention, not this CPU host's: cuDNN under a
  context axis is refused for what it is on GPUs (it had been refused as "needs a GPU"), and a
  block size the per-shard splash kernel never uses is no reason to refuse a TPU plan."""
  from configs import llama_8b_131k

  config = llama_8b_131k.get_config()
  config.model.attention = "cudnn"
  with pytest.raises(config_lib.ConfigError, match=r"'cudnn' cannot run under 2 context shards"):
    plan_lib.plan(config, topology_lib.parse("h100:8"), use_compiler=False)
  config.model.attention = "auto"
  assert plan_lib.plan(config, topology_lib.parse("h100:8"), use_compiler=False)["mesh"]
  config = llama_8b_131k.get_config()
  config.data.seq_len, config.model.attention_block = 1280 * 2, 512  # 1280 a shard: 10 × 128
  result = plan_lib.plan(config, topology_lib.parse("v5p-128"), use_compiler=False)
  assert result["attention"] == "context:all_gather+splash"
  with pytest.raises(config_lib.ConfigError, match=r"attention_block=512 does not divide"):
    plan_lib.plan(config, topology_lib.parse("h100:8"), use_compiler=False)  # XLA's blocks


def test_the_moe_line_names_the_platform_whose_dispatch_auto_took():
  moe = {"num_experts": 8, "experts_per_token": 2, "expert_dim": 256, "dispatch": "dropless"}
  moe.update(setting="auto", expert_ways=1, capacity_factor=1.0, buffer_rows_per_token=2.0)
  assert "(model.moe.dispatch=auto, as on GPUs)" in plan_cli.moe_line(
    {"moe": dict(moe, platform="gpu")}
  )
  assert "(model.moe.dispatch=auto, as on TPUs)" in plan_cli.moe_line(
    {"moe": dict(moe, platform="tpu")}
  )


def small_llama():
  """llama_1b's shape family (GQA, SwiGLU, RoPE, bf16, remat), shrunk so that it compiles in
  seconds; layers unrolled because XLA's cost analysis counts a scanned body once."""
  from configs import llama_1b

  config = llama_1b.get_config()
  config.model.update(
    dict(
      num_layers=2,
      d_model=256,
      mlp_dim=512,
      vocab_size=1024,
      num_heads=4,
      num_kv_heads=2,
      head_dim=64,
      scan_layers=False,
    )
  )
  config.data.seq_len = 256
  config.train.batch_size = 64
  # The einsum: XLA's cost analysis cannot see inside a Pallas kernel, so its FLOPs would be
  # missing from the compiled count this file checks.
  config.model.attention = "xla"
  return config


def test_ahead_of_time_compilation_for_a_64_chip_pod():
  topology = topology_lib.parse("v5p-128")
  try:
    tpu_slice.compile_only_devices(topology)
  except RuntimeError as e:
    pytest.skip(f"libtpu is not installed here (.ci/run installs it): {e}")
  config = small_llama()
  result = plan_lib.plan(config, topology, tokens=10**9)
  assert result["method"].startswith("compiled"), result
  assert (
    result["chips"] == 64
    and result["mesh"] == "stage=1 × data=1 × fsdp=64 × context=1 × expert=1 × tensor=1"
  )
  breakdown = result["memory_breakdown_bytes"]
  # The arguments are this chip's shards of the train state, plus its batch rows.
  model_cfg = config_lib.model_config(config, with_tokenizer=False)
  mesh = mesh_lib.make_mesh(config.mesh, tpu_slice.compile_only_devices(topology))
  rules = mesh_lib.logical_rules(config.mesh)
  programs = jit_programs(config, mesh, rules, model_cfg)
  spec, batch = programs.spec, programs.abstract_batch
  shard_bytes = sum(
    math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    for leaf in jax.tree.leaves([spec.abstract, batch])
  )
  # TPU layouts pad tiny shards (a [4, 512] kernel shard to 8 rows), hence the margin.
  assert shard_bytes <= breakdown["arguments"] < 1.5 * shard_bytes
  assert result["memory_per_chip_bytes"] >= breakdown["arguments"] + breakdown["temporaries"]
  assert result["fits"] and 0 < result["memory_per_chip_bytes"] < result["hbm_per_chip_bytes"]
  # The compiled program does the analytic model's matmuls, plus softmax, norms and the
  # optimizer (a few percent here) and any rematerialised matmuls.
  ratio = result["flops_per_step_compiled"] / result["flops_per_step"]
  assert 0.95 < ratio < 1.4, ratio
  assert result["step_time_s"] > 0 and result["energy_kwh"] > 0
  # bf16 projections: no int8 (or fp8) dot in the program; the einsum's attention (asked for).
  assert result["low_precision_in_program"] == {"fp8": 0, "int8": 0}
  assert result["attention_in_program"] == ["XLA"]
  assert (
    result["compile_effort"] == "full" and result["method"] == "compiled (libtpu, ahead of time)"
  )

  # --quick: the same program at XLA's least optimization effort (QUICK_COMPILE). The option
  # reaches libtpu: its schedule, and so its memory figure, differs from the full compile's.
  quick = plan_lib.plan(config, topology, tokens=10**9, quick=True)
  assert quick["compile_effort"] == "quick" and quick["method"].endswith(
    ", quick: least optimization effort)"
  ), quick["method"]
  assert quick["memory_breakdown_bytes"]["arguments"] == breakdown["arguments"]
  assert quick["memory_per_chip_bytes"] != result["memory_per_chip_bytes"]
  assert quick["memory_per_chip_bytes"] == pytest.approx(result["memory_per_chip_bytes"], rel=0.2)
  assert quick["fits"] and quick["attention_in_program"] == ["XLA"]
  with pytest.raises(ValueError, match="--quick compiles with less effort, --analytic does not"):
    plan_lib.plan(config, topology, quick=True, use_compiler=False)


def test_int8_projections_compile_to_int8_dots_on_a_v5e_slice():
  """model.quant=int8 on v5e-8 (int8 MXU): small_llama's 2 layers x 7 projections (q, k, v,
  out; gate, up, down) are 14 dots of int8 operands forward and 28 backward (the input and the
  weight gradients), as XLA's TPU compiler writes them (convolutions of s8 operands). One row of
  128 tokens per chip: the claim is the dots, not the memory."""
  topology = topology_lib.parse("v5e-8")
  try:
    tpu_slice.compile_only_devices(topology)
  except RuntimeError as e:
    pytest.skip(f"libtpu is not installed here (.ci/run installs it): {e}")
  config = small_llama()
  config.model.quant = "int8"
  config.data.seq_len, config.train.batch_size = 128, 8
  result = plan_lib.plan(config, topology)
  assert result["method"].startswith("compiled"), result
  assert result["low_precision_in_program"] == {"fp8": 0, "int8": 42}
  forms = {(g["pass"], g["operands"]): g["count"] for g in result["low_precision_gemms"]}
  assert forms == {("forward", "s8 x s8"): 14, ("backward", "s8 x s8"): 28}
  assert result["fits"]
  assert plan_cli.low_precision_line(result).endswith(
    ": int8 ×42 (forward 14, backward 28; convolution)"
  )


def test_fp8_on_a_tpu_without_fp8_units_is_refused_before_planning():
  """The hardware table's check (train/meter/hardware.py), before any compile: --analytic too."""
  config = small_llama()
  config.model.quant = "fp8"
  message = r"model.quant='fp8': TPU v5e has no fp8 matmul units .*use model.quant='int8' or"
  with pytest.raises(ValueError, match=message):
    plan_lib.plan(config, topology_lib.parse("v5e-8"), use_compiler=False)
  config.model.quant_emulation = True  # asked for: planned (the emulation, no faster)
  assert plan_lib.plan(config, topology_lib.parse("v5e-8"), use_compiler=False)["fits"]


SPLASH_KERNELS = [
  "splash_mha_dkv_segmented_no_residuals",
  "splash_mha_dq_segmented_no_residuals",
  "splash_mha_fwd_segmented_residuals",
]


@pytest.mark.slow
def test_llama_8b_compiles_for_v5p_128_with_splash_attention_and_a_chunked_loss():
  """The whole llama_8b train step, compiled ahead of time for a v5p-128 slice: the splash
  kernel is in the program (its [L, L] scores never exist; with the einsum, XLA runs out of
  scoped VMEM on them) and the chunked loss keeps fp32 logits over 128k words out of HBM.
  Compiled --quick (71 -> 33 s); the 64-chip test above compiles at full effort too."""
  topology = topology_lib.parse("v5p-128")
  try:
    tpu_slice.compile_only_devices(topology)
  except RuntimeError as e:
    pytest.skip(f"libtpu is not installed here (.ci/run installs it): {e}")
  result = plan_lib.plan(llama_8b(), topology, quick=True)
  assert result["method"].startswith("compiled"), result
  assert result["attention"] == "splash" and result["loss_chunk"] == 1024
  assert result["attention_in_program"] == SPLASH_KERNELS, result["attention_in_program"]
  assert result["fits"] and result["memory_per_chip_bytes"] < 30 * 1024**3, result
  estimate = result["analytic_memory_per_chip_bytes"]
  # What the plan says the kernels save: more than the slice's HBM, without them.
  saved = estimate["saved_by_attention_kernel"] + estimate["saved_by_loss_chunks"]
  assert estimate["total"] + saved > result["hbm_per_chip_bytes"]


@pytest.mark.slow
def test_long_context_and_pipeline_plans_compile_for_tpu_slices():
  """configs/llama_8b_131k.py (rows of 131,072 tokens over a context axis of 2) on a v5p-128,
  and configs/llama_70b.py (two stages, one per slice, over DCN) on two v5p-128 slices, each
  compiled ahead of time at reduced depth (the scanned layer body is the same at any depth;
  docs/long_context.md has the full-depth figures), --quick."""
  from configs import llama_8b_131k, llama_70b

  topology = topology_lib.parse("v5p-128")
  try:
    tpu_slice.compile_only_devices(topology)
  except RuntimeError as e:
    pytest.skip(f"libtpu is not installed here (.ci/run installs it): {e}")
  config = llama_8b_131k.get_config()
  config.model.num_layers = 2
  result = plan_lib.plan(config, topology, quick=True)
  assert result["method"].startswith("compiled") and result["fits"], result
  assert "context=2" in result["mesh"] and result["attention"] == "context:all_gather+splash"
  # The splash kernel per shard, forward and backward, as compiled (models/attention.py).
  assert result["attention_in_program"] == SPLASH_KERNELS, result["attention_in_program"]
  assert result["tokens_per_step"] == 32 * 131072 and "all-gather" in result["collectives"]

  config = llama_70b.get_config()
  config.model.num_layers = 8
  config.train.batch_size, config.pipeline.microbatches = 128, 2  # one row per chip: faster
  result = plan_lib.plan(config, topology_lib.parse("v5p-128", num_slices=2), quick=True)
  assert result["method"].startswith("compiled") and result["fits"], result
  assert result["chips"] == 128 and "stage=2" in result["mesh"] and "dcn_stage=2" in result["dcn"]
  assert result["pipeline"]["bubble"] == pytest.approx(1 / 3, abs=1e-4)
  assert result["pipeline"]["step_time_with_bubble_s"] > result["step_time_s"]


def small_moe():
  """small_llama with 8 experts (top-2) split over an expert axis of 8: the exchange by
  all-to-all inside shard_map, compiled for the slice. One row of 128 tokens per chip: the
  compile time grows with the tokens (about 27 s for small_llama's 64 rows of 256)."""
  config = small_llama()
  config.model.moe.update(dict(num_experts=8, experts_per_token=2, expert_dim=256))
  config.model.scan_layers = True
  config.mesh.expert = 8
  config.data.seq_len = 128
  config.train.batch_size = 8
  return config


def test_ahead_of_time_compilation_of_an_expert_parallel_moe():
  topology = topology_lib.parse("v5p-16")
  try:
    tpu_slice.compile_only_devices(topology)
  except RuntimeError as e:
    pytest.skip(f"libtpu is not installed here (.ci/run installs it): {e}")
  config = small_moe()
  # auto resolves by the backend that traces, the CPU here: the plan must take the TPU's choice.
  config.model.moe.dispatch = "auto"
  assert plan_lib.dispatch_for_tpu(config).model.moe.dispatch == "dropless"
  assert config.model.moe.dispatch == "auto"  # the caller's config is left as it was
  result = plan_lib.plan(config, topology)
  assert result["method"].startswith("compiled"), result
  assert result["mesh"] == "stage=1 × data=1 × fsdp=1 × context=1 × expert=8 × tensor=1"
  moe = result["moe"]
  assert moe["setting"] == "auto" and moe["dispatch"] == "dropless" and moe["expert_ways"] == 8
  assert "dropless dispatch (model.moe.dispatch=auto, as on TPUs)" in plan_cli.moe_line(result)
  assert result["expert_all_to_all_in_program"] is True  # the exchange is in the program
  assert result["params_active"] < result["params"]
  # The compiled arguments are the state's shards: the analytic parameter split is exact.
  state = result["analytic_memory_per_chip_bytes"]["state"]
  assert state <= result["memory_breakdown_bytes"]["arguments"] < 1.5 * state
  assert result["fits"]
