"""train.plan for NVIDIA GPUs: the train step compiled for H100s and H200s on this CPU machine.

The CUDA plugin's compile-only devices (the ``[gpu-plan]`` extra, which the test extra brings) are
made from the target config that the hardware table writes. The compiles here keep each claim's
real widths and shrink only what the claim does not need (the layers, the rows): the cuDNN kernels
and their packed-row operands, the fit of a full-size step, generation's programs, and the
nodes-over-DCN mesh. Without the plugin the compile tests are skipped (``.ci/run`` installs it).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention as attention_lib
from models import quant as quant_lib
from train import config as config_lib
from train import plan as plan_cli
from train import planning as plan_lib
from train.cluster import gpu_nodes
from train.inference.engine import Engine
from train.inference.sampling import Sampling
from train.meter import gemms as gemms_lib
from train.meter import hardware, hlo_text
from train.programs import jit_programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3


def test_gpu_names():
  nodes = hardware.parse("h100:8x4")
  assert (nodes.chips, nodes.num_slices, nodes.cuda_topology) == (32, 4, "4x1x8")
  assert nodes.chip.hbm_bytes == 84_942_979_072
  single = hardware.parse("h200:8")
  assert (single.chips, single.cuda_topology) == (8, "1x1x8")
  assert single.chip.hbm_bytes == 141 * GiB
  assert hardware.parse("h100:4", num_slices=2).nodes == 2
  with pytest.raises(ValueError, match="names its nodes and --num_slices=3 names them again"):
    hardware.parse("h100:8x2", num_slices=3)  # 6 nodes, or 3? Said once, or refused


@pytest.mark.parametrize(
  "name, message",
  [
    ("h100:7x", "unknown GPU hardware 'h100:7x': write KIND:N or KIND:NxNODES"),
    ("a100:8", "with KIND one of h200, h100"),
    ("h100:7", "GPUs per node must be one of 1, 2, 4, 8"),
    ("h100:8x0", "8 GPUs per node and 0 nodes"),
    ("h100", "unknown TPU topology 'h100'.*or GPUs as KIND:N"),
  ],
)
def test_bad_gpu_names_say_what_is_valid(name, message):
  with pytest.raises(ValueError, match=message):
    hardware.parse(name)


def test_target_config_is_written_from_the_table():
  for kind in ("h100", "h200"):
    accelerator = hardware.ACCELERATORS[kind]
    text = hardware.gpu_target_config(accelerator)
    assert f"device_memory_size: {accelerator.hbm_bytes}\n" in text
    assert f"memory_bandwidth: {accelerator.gpu.memory_bandwidth}\n" in text
    assert f'device_description_str: "{accelerator.gpu.description}"' in text
    # A field of XLA's newer spec files that jaxlib 0.10.2 cannot parse.
    assert "collective_memory_granularity" not in text
    # Without a CUDA 12 runtime the compiler makes no fp8 GEMM.
    assert "runtime_version { major: 12 minor: 9 }" in text
  with pytest.raises(ValueError, match="NVIDIA A100 SXM has no GPU target config"):
    hardware.gpu_target_config(hardware.ACCELERATORS["a100"])


def test_collectives_and_attention_calls_are_read_from_the_program_text():
  hlo = "\n".join(
    [
      # An asynchronous all-gather returns (operands, outputs): the outputs count.
      "%ag = ((f32[96]{0}, /*index=1*/bf16[96,768]{1,0}), (f32[768]{0}, bf16[768,768]{1,0})) "
      "all-gather-start(%a, %b), channel_id=1",
      "%ar = f32[34]{0} all-reduce-start(%c), channel_id=2",
      "%rs = bf16[16]{0} reduce-scatter(%d), dimensions={0}",
      "%f = (bf16[2,12,1024,64]{3,1,2,0}, f32[128,12,1024]{2,1,0}) custom-call(%q, %k), custom_c"
      'all_target="__cudnn$fmhaSoftmax", operand_layout_constraints={bf16[2,1024,12,64]{3,2,1,0}'
      ", bf16[2,1024,4,64]{3,2,1,0}, bf16[2,1024,4,64]{3,2,1,0}"
      ", s32[2,64]{1,0}, s32[2,64]{1,0}, s32[2,65]{1,0}, s32[2,65]{1,0}}, api_version=API_VERS"
      'ION_STATUS_RETURNING, backend_config={"mask_type": "PADDING_CAUSAL"}',
    ]
  )
  assert hlo_text.collectives(hlo) == {
    "all-gather": {"count": 1, "bytes": 768 * 4 + 768 * 768 * 2},
    "all-reduce": {"count": 1, "bytes": 34 * 4},
    "reduce-scatter": {"count": 1, "bytes": 32},
  }
  assert hlo_text.cudnn_attention_calls(hlo) == [
    {
      "target": "__cudnn$fmhaSoftmax",
      "mask_type": "PADDING_CAUSAL",
      "ragged_offsets": "s32[2,65]",
      "heads": (12, 4),  # query, key heads of the operands
    }
  ]


def test_low_precision_gemms_are_read_from_the_program_text():
  """fp8 and int8 matmuls by their operands' element types, read within their computation
  (names repeat across computations): a Triton GEMM fusion counted per call (two calls of one
  deduplicated computation), a cuBLASLt call, a TPU convolution; a bf16 dot and a cuDNN call are
  not counted."""
  hlo = "\n".join(
    [
      "%gemm_fusion_dot.1_computation (parameter_0: f8e4m3fn[64,32], parameter_1: f8e5m2[16,32]) "
      "-> f32[64,16] {",
      "  %parameter_0 = f8e4m3fn[64,32]{1,0} parameter(0)",
      "  %parameter_1 = f8e5m2[16,32]{1,0} parameter(1)",
      "  ROOT %dot.1 = f32[64,16]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}",
      "}",
      "",
      "ENTRY %main (a: f8e4m3fn[64,32], b: f8e5m2[16,32], c: s8[8,8]) -> f32[64,16] {",
      "  %a = f8e4m3fn[64,32]{1,0} parameter(0)",
      "  %b = f8e5m2[16,32]{1,0} parameter(1)",
      "  %c = s8[8,8]{1,0:T(8,128)(4,1)} parameter(2)",
      "  %parameter_0 = bf16[8,8]{1,0} parameter(3)",
      "  %x = bf16[8,8]{1,0} copy(%parameter_0)",
      "  %g.1 = f32[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.1_computa"
      'tion, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}, backend_config={"kind'
      '":"__triton_nested_gemm_fusion"}',
      "  %g.2 = f32[64,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.1_computa"
      'tion, metadata={op_name="jit(step)/transpose(jvp())/dot_general"}, backend_config={"kind'
      '":"__triton_nested_gemm_fusion"}',
      "  %cc = (bf16[64,64]{1,0}, s8[0]{0}) custom-call(%a, %a, %s, %s), custom_call_target="
      '"__cublas$lt$matmul$f8", metadata={op_name="jit(step)/jvp()/dot_general"}',
      "  %i = s32[8,8]{1,0:T(8,128)} convolution(%c, %c), dim_labels=bf_io->bf, metadata={op_na"
      'me="jit(step)/jvp()/dot_general"}',
      "  %w = bf16[8,8]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
      '  %f = bf16[8,8]{1,0} custom-call(%x, %x), custom_call_target="__cudnn$fmhaSoftmax"',
      "}",
    ]
  )
  assert gemms_lib.low_precision_gemms(hlo) == [
    {
      "format": "fp8",
      "kernel": "__cublas$lt$matmul$f8",
      "pass": "forward",
      "operands": "f8e4m3fn x f8e4m3fn",
      "count": 1,
    },
    {
      "format": "fp8",
      "kernel": "triton",
      "pass": "backward",
      "operands": "f8e4m3fn x f8e5m2",
      "count": 2,
    },
    {
      "format": "int8",
      "kernel": "convolution",
      "pass": "forward",
      "operands": "s8 x s8",
      "count": 1,
    },
  ]


def test_a_plan_over_what_jax_preallocates_says_how_to_run_it():
  hbm = hardware.ACCELERATORS["h100"].hbm_bytes
  # gpt2_small with XLA attention on 8 H100s: 69.3 GiB of 79.1 (docs/gpus.md).
  note = plan_lib.preallocation_note(int(69.26 * GiB), hbm)
  assert (
    note.startswith("88% of the GPU's memory") and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in note
  )
  # At 97% the fraction is named ("e.g. 0.95" had been too little); at 98% none leaves the CUDA
  # context and the libraries room.
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.99" in plan_lib.preallocation_note(int(0.97 * hbm), hbm)
  assert "use more GPUs" in plan_lib.preallocation_note(int(0.98 * hbm), hbm)
  assert plan_lib.preallocation_note(int(33.6 * GiB), hbm) is None
  assert plan_lib.preallocation_note(hbm + 1, hbm) is None  # does not fit: no way to run it


@pytest.fixture(scope="module")
def h100x8():
  try:
    return gpu_nodes.compile_only_devices(hardware.parse("h100:8"))
  except RuntimeError as e:
    pytest.skip(f"the CUDA plugin is not installed here (.ci/run installs it): {e}")


def test_compile_only_devices_are_the_tables_gpus(h100x8):
  assert len(h100x8) == 8
  assert {d.device_kind for d in h100x8} == {"NVIDIA H100 80GB HBM3"}
  assert hardware.lookup(h100x8[0].device_kind) is hardware.ACCELERATORS["h100"]
  assert h100x8[0].compute_capability == "9.0"


def two_layers(name: str, rows: int):
  """A config of configs/NAME.py at its real width and row length, with 2 layers and ``rows``
  rows (per step, over 8 GPUs): the kernels and their operands are the full model's."""
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  config = module.get_config()
  config.model.num_layers = 2
  config.train.batch_size = rows
  assert config.model.attention == "auto"
  return config


@pytest.fixture(scope="module")
def gpt2_plan(h100x8):
  return plan_lib.plan(two_layers("gpt2_small", 16), hardware.parse("h100:8"))


@pytest.fixture(scope="module")
def llama_plan(h100x8):
  return plan_lib.plan(two_layers("llama_1b", 16), hardware.parse("h100:8"))


@pytest.mark.parametrize("which", ["gpt2_plan", "llama_plan"])
def test_cudnn_attention_forward_and_backward_take_packed_rows(which, request):
  result = request.getfixturevalue(which)
  assert result["method"] == "compiled (CUDA plugin, ahead of time, no GPU)", result
  assert result["attention"] == "cudnn"
  assert result["attention_in_program"] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
  # The packed rows reach cuDNN as ragged runs: a padding-causal mask and, on each GPU, the
  # offsets of its own 2 rows (model.max_segments = 64 runs, and the end), not all 16 rows'.
  heads = {"gpt2_plan": 12, "llama_plan": 32}[which]
  for call in result["attention_calls"]:
    assert call["mask_type"] == "PADDING_CAUSAL", call
    assert call["ragged_offsets"] == "s32[2,65]", call
    # llama_1b's 8 key heads reach cuDNN repeated to its 32 query heads: JAX's binding steps
    # through packed keys by the query heads' width, so 8 would be read at the wrong offsets.
    assert tuple(call["heads"]) == (heads, heads), call
  assert result["fits"] and result["memory_per_chip_bytes"] < result["hbm_per_chip_bytes"]
  # Fully-sharded data parallelism: parameters gathered, gradients reduce-scattered.
  assert {"all-gather", "reduce-scatter"} <= set(result["collectives"]), result["collectives"]
  assert result["step_time_s"] == pytest.approx(
    result["flops_per_step"] / (8 * 989e12 * result["mfu"])
  )


def test_auto_attention_takes_cudnn_only_where_it_runs_packed_rows():
  """JAX's cuDNN binding runs packed rows on Hopper or later, head widths a multiple of 8 up to
  256: elsewhere 'auto' is the XLA einsum (an A100 run had crashed at its first trace with
  NotImplementedError), and an explicit 'cudnn' is a one-line refusal."""
  from models import attention

  assert attention.implementation("auto", "bfloat16", 1024, "gpu", 64, 9.0) == "cudnn"
  assert attention.implementation("auto", "bfloat16", 1024, "gpu", 64, 8.0) == "xla"
  assert attention.implementation("auto", "bfloat16", 1024, "gpu", 384, 9.0) == "xla"
  with pytest.raises(ValueError, match=r"'cudnn': .*Hopper or later GPU .* this one has 8\.9"):
    attention.implementation("cudnn", "bfloat16", 1024, "gpu", 64, 8.9)
  with pytest.raises(ValueError, match=r"model.head_dim a multiple of 8, at most 256 \(384\)"):
    attention.implementation("cudnn", "bfloat16", 1024, "gpu", 384, 9.0)
  # A plan takes its GPUs' compute capability from the hardware table (traced on a CPU host).
  assert hardware.ACCELERATORS["h100"].compute_capability == 9.0
  assert hardware.ACCELERATORS["a100"].compute_capability == 8.0
  h100 = plan_lib.plan(two_layers("gpt2_small", 16), hardware.parse("h100:8"), use_compiler=False)
  assert h100["attention"] == "cudnn"
  assert hardware.lookup("NVIDIA GH200 480GB") is None  # not the H200's entry
  assert hardware.lookup("NVIDIA H200") is hardware.ACCELERATORS["h200"]


def test_the_attention_kernel_keeps_the_scores_out_of_memory(gpt2_plan, h100x8):
  """The same program with the XLA einsum: no cuDNN call, and more memory (the scores)."""
  config = two_layers("gpt2_small", 16)
  config.model.attention = "xla"
  result = plan_lib.plan(config, hardware.parse("h100:8"))
  assert result["attention_in_program"] == ["XLA"]
  # Measured: 1.32 against 0.90 GB per GPU (the fp32 scores of 2 rows of 12 heads, 1,024²).
  assert result["memory_per_chip_bytes"] > 1.3 * gpt2_plan["memory_per_chip_bytes"]
  lines = plan_cli.summary_lines(gpt2_plan)
  assert any(
    "__cudnn$fmhaSoftmaxBackward (packed rows, ragged offsets s32[2,65]" in x for x in lines
  )


def test_bf16_projections_compile_to_no_low_precision_gemm(gpt2_plan):
  assert gpt2_plan["low_precision_in_program"] == {"fp8": 0, "int8": 0}
  assert gpt2_plan["low_precision_gemms"] == []
  lines = plan_cli.summary_lines(gpt2_plan)
  assert "low-precision GEMMs in the compiled program (a loop body once): none" in lines


def narrow_llama(layers: int = 2):
  """llama_1b's projections (q, k, v, out; gate, up, down: 7 a layer) at a narrow width, rows of
  256 tokens, ``layers`` unrolled (a scanned stack's body would appear once in the program)."""
  config = two_layers("llama_1b", 16)
  config.model.update(
    dict(
      num_layers=layers,
      d_model=256,
      mlp_dim=512,
      num_heads=4,
      num_kv_heads=2,
      head_dim=64,
      scan_layers=False,
    )
  )
  config.data.seq_len = 256
  return config


@pytest.fixture(scope="module")
def fp8_plan(h100x8):
  config = narrow_llama()
  config.model.quant = "fp8"
  return plan_lib.plan(config, hardware.parse("h100:8"))


def test_fp8_projections_compile_to_fp8_gemms_forward_and_backward(fp8_plan):
  """2 layers x 7 projections, all in fp8: forward (e4m3 x e4m3) in 8 GEMMs, as XLA merges the
  GEMMs that share their input (q, k and v into one, gate and up into one: 4 per layer); 14 for
  the input gradients (e5m2 output gradient x e4m3 weight) and 14 for the weight gradients. No
  autotuning runs here, so each is XLA's default, a Triton GEMM on the fp8 operands; on a GPU
  the autotuner may take cuBLASLt's instead (next test)."""
  assert fp8_plan["low_precision_in_program"] == {"fp8": 36, "int8": 0}
  forms = {(g["pass"], g["operands"]): g["count"] for g in fp8_plan["low_precision_gemms"]}
  assert forms == {
    ("forward", "f8e4m3fn x f8e4m3fn"): 8,
    ("backward", "f8e5m2 x f8e4m3fn"): 14,
    ("backward", "f8e4m3fn x f8e5m2"): 14,
  }
  assert {g["kernel"] for g in fp8_plan["low_precision_gemms"]} == {"triton"}
  assert fp8_plan["fits"] and fp8_plan["attention_in_program"] == [
    "__cudnn$fmhaSoftmax",
    "__cudnn$fmhaSoftmaxBackward",
  ]
  lines = plan_cli.summary_lines(fp8_plan)
  expected = "compiled program (a loop body once): fp8 ×36 (forward 8, backward 28; triton)"
  assert any(line.endswith(expected) for line in lines), lines


def test_without_triton_the_fp8_gemms_are_cublaslt_calls(h100x8):
  """models/quant.py's matmul and its two gradients, with XLA's Triton GEMMs turned off (as the
  autotuner may choose on a GPU): one cuBLASLt fp8 GEMM each."""
  mesh = jax.sharding.Mesh(np.asarray(h100x8[:1]), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16, sharding=sharding)
  w = jax.ShapeDtypeStruct((128, 64), jnp.bfloat16, sharding=sharding)

  def loss(x, w):
    return jnp.square(quant_lib.matmul(x, w, "fp8").astype(jnp.float32)).sum()

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  options = {"xla_gpu_enable_triton_gemm": False}
  hlo = step.lower(x, w).compile(compiler_options=options).as_text()
  gemms = gemms_lib.low_precision_gemms(hlo)
  assert {g["kernel"] for g in gemms} == {"__cublas$lt$matmul$f8"}, gemms
  assert {(g["pass"], g["count"]) for g in gemms} == {("forward", 1), ("backward", 1)}
  assert len(gemms) == 3  # forward, input gradient, weight gradient


def test_cudnn_checks_read_the_target_gpu(h100x8):
  """JAX's cuDNN binding checks the default backend (this CPU) for Hopper: packed rows and
  head dim 256 are refused for an H100 unless the check reads the compile-only device."""
  mesh = jax.sharding.Mesh(np.asarray(h100x8[:1]), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  q = jax.ShapeDtypeStruct((1, 256, 2, 256), jnp.bfloat16, sharding=sharding)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32, sharding=sharding)

  def loss(q, ids):
    return attention_lib.cudnn_attention(q, q, q, ids, 0.0625, 4).astype(jnp.float32).sum()

  step = jax.jit(jax.grad(loss))
  with pytest.raises(NotImplementedError, match="Hopper|head dim"):
    step.lower(q, ids)
  with attention_lib.cudnn_checks_for(h100x8[0]):
    hlo = step.lower(q, ids).compile().as_text()
  assert len(hlo_text.cudnn_attention_calls(hlo)) == 2


def test_generation_compiles_for_8_gpus(h100x8):
  """Prefill and decode of gpt2_small (2 layers) with the KV cache on the 8-GPU mesh."""
  config = two_layers("gpt2_small", 8)
  model_cfg = config_lib.model_config(config, with_tokenizer=False)
  resolved = config_lib.validate(config, devices=h100x8, process_count=1, with_tokenizer=False)
  programs = jit_programs(config, resolved.mesh, resolved.rules, model_cfg)
  engine = Engine(programs.spec.graphdef, model_cfg, resolved.mesh, resolved.rules)
  prompts = [[1] * 40] * 8  # one row per GPU; a prefill of 32 + 4 + 2 + 1 tokens
  with attention_lib.cudnn_checks_for(h100x8[0]):
    make_cache, step, prefills = engine.compile(
      programs.spec.abstract["params"], prompts, max_new_tokens=16, sampling=Sampling()
    )
  assert [length for length, _ in prefills] == [32, 4, 2, 1]
  for program in (make_cache, step, *(p for _, p in prefills)):
    assert 0 < program.memory_analysis().temp_size_in_bytes < GiB


@pytest.mark.slow
def test_full_size_gpt2_small_fits_8_h100s(h100x8):
  """configs/gpt2_small.py as it is (12 layers, 256 rows of 1,024 tokens): the one full-size
  compile, for the fit."""
  from configs import gpt2_small

  result = plan_lib.plan(gpt2_small.get_config(), hardware.parse("h100:8"))
  assert result["attention_in_program"] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
  assert result["fits"], result
  assert 10 * GiB < result["memory_per_chip_bytes"] < 80e9
  breakdown = result["memory_breakdown_bytes"]
  assert result["memory_per_chip_bytes"] >= breakdown["arguments"] + breakdown["temporaries"]


def run_plan(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "train.plan", *args]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_reports_llama_8b_on_one_h100_as_not_fitting(h100x8):
  """One row is enough: the parameters and Adam's moments of 8B parameters alone (~96 GB in
  float32) overflow one H100's 79.1 GiB."""
  result = run_plan(
    "--config=configs/llama_8b.py", "--hardware=h100:1", "--config.train.batch_size=1"
  )
  assert result.returncode == 0, result.stderr[-2000:]
  last = json.loads(result.stdout.strip().splitlines()[-1])
  assert last["method"].startswith("compiled (CUDA plugin") and last["fits"] is False
  assert last["memory_per_chip_bytes"] > 8.0e9 * 12 > last["hbm_per_chip_bytes"]
  assert "DOES NOT FIT" in result.stdout and "of 79.11 GiB HBM" in result.stdout
  bad = run_plan("--config=configs/llama_8b.py", "--hardware=h100:7x")
  assert bad.returncode == 2
  assert "unknown GPU hardware 'h100:7x'" in bad.stderr


def test_nodes_join_over_the_data_centre_network(h100x8):
  """h100:8x4: four nodes of 8, the nodes on the mesh's DCN data axis (replicas across nodes,
  FSDP within one). A narrow 2-layer model: the claim is the mesh and its collectives."""
  config = two_layers("llama_1b", 32)
  config.model.update(dict(d_model=256, mlp_dim=512, num_heads=4, num_kv_heads=2, head_dim=64))
  config.data.seq_len = 256
  result = plan_lib.plan(config, hardware.parse("h100:8x4"))
  assert result["cuda_topology"] == "4x1x8" and result["chips"] == 32
  assert result["mesh"] == "stage=1 × data=4 × fsdp=8 × context=1 × expert=1 × tensor=1"
  assert result["dcn"] == (
    "dcn_stage=1 × dcn_data=4 × dcn_fsdp=1 × dcn_context=1 × dcn_expert=1 × dcn_tensor=1"
  )
  # The config set no DCN size: the plan says what the run must set to be this plan.
  assert "run it with --config.mesh.dcn_data=4" in result["mesh_note"]
  assert "mesh note: planned with mesh.dcn_data=4" in "\n".join(plan_cli.summary_lines(result))
  # Gradients are summed across the replicas (an all-reduce over the nodes) besides FSDP's.
  assert {"all-gather", "reduce-scatter", "all-reduce"} <= set(result["collectives"])
  assert result["fits"]
