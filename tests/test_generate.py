"""Generation: cached decoding is exact, batching is exact, samplers respect their sets, errors are
clear, and it all runs sharded on the 8 fake CPU devices."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import models
from configs import tiny
from models.config import ModelConfig
from train import state as state_lib
from train.cluster import mesh as mesh_lib
from train.inference import engine as engine_lib
from train.inference import generation, loading
from train.inference import sampling as sampling_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tiny_run) -> str:
  """The session's tiny run: 20 steps, checkpoints at steps 10 and 20 (read-only)."""
  return tiny_run[0]


@pytest.fixture(scope="module")
def model(workdir) -> loading.Model:
  return loading.load(workdir)


# --- exactness of the cached path --------------------------------------------------------------

CASES = {  # RoPE and learned positions, GQA / MQA / MHA, scanned and unrolled layers
  "rope-gqa-scan": {},  # the tiny config: 4 query heads over 2 kv heads
  "rope-gqa-unrolled": {"scan_layers": False},
  "learned-mha-scan": {"positions": "learned", "num_kv_heads": -1},
  "rope-mqa-untied-unrolled": {"num_kv_heads": 1, "tie_embeddings": False, "scan_layers": False},
}


@pytest.mark.parametrize("case", CASES)
def test_generation_logits_match_full_forward(case):
  """Every logit the generate path sampled from equals the uncached forward pass's at that
  position: prefill chunks, teacher-forced prompt tails and decode steps included."""
  config = tiny.get_config()
  config.model.update(CASES[case])
  model_cfg = ModelConfig.from_config(config.model, seq_len=config.data.seq_len, vocab_size=258)
  mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.logical_rules(config.mesh)
  spec = state_lib.state_spec(model_cfg, optax.identity(), mesh, rules)

  def init():
    model = models.Transformer(model_cfg, rngs=nnx.Rngs(params=1))
    return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])

  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    params = jax.jit(init, out_shardings=spec.shardings["params"])()
  engine = engine_lib.Engine(spec.graphdef, model_cfg, mesh, rules)
  prompts = [[5, 17, 99, 3, 200, 1, 2], [42, 7, 8], [9] * 12]  # 7, 3 and 12 tokens
  new = 6
  out = engine.run(
    params,
    prompts,
    max_new_tokens=new,
    sampling=sampling_lib.Sampling(0.9, top_k=50),
    seed=3,
    eod_id=None,
    record_logits=True,
  )

  # One uncached forward over all rows, right-padded (causal: padding never reaches earlier slots).
  width = max(map(len, prompts)) + new
  rows = [p + t + [0] * (width - len(p) - len(t)) for p, t in zip(prompts, out.tokens, strict=True)]
  full = jax.jit(lambda p, t: nnx.merge(spec.graphdef, p)(t, jnp.arange(width)[None]))(
    params, jnp.asarray(rows, jnp.int32)
  )
  for i, prompt in enumerate(prompts):
    assert len(out.tokens[i]) == new and out.logits[i].shape == (new, model_cfg.vocab_size)
    expected = full[i, len(prompt) - 1 : len(prompt) - 1 + new]
    np.testing.assert_allclose(out.logits[i], expected, atol=2e-5, rtol=2e-5)
  # record_logps (GRPO's rollouts): the same tokens, each with its log-probability at the
  # sampling temperature, computed on the devices.
  again = engine.run(
    params,
    prompts,
    max_new_tokens=new,
    sampling=sampling_lib.Sampling(0.9, top_k=50),
    seed=3,
    eod_id=None,
    record_logps=True,
  )
  assert again.tokens == out.tokens and again.logits is None
  for i, tokens in enumerate(out.tokens):
    logp = np.asarray(jax.nn.log_softmax(out.logits[i] / 0.9, axis=-1))
    chosen = np.take_along_axis(logp, np.asarray(tokens)[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(again.logps[i], chosen, atol=1e-5)


def test_chunk_lengths_are_powers_of_two():
  assert engine_lib.chunk_lengths(13) == [8, 4, 1]
  assert engine_lib.chunk_lengths(0) == []
  assert all(sum(engine_lib.chunk_lengths(n)) == n for n in range(100))


# --- determinism, batching, sampling -----------------------------------------------------------


def test_greedy_is_deterministic_and_equals_near_zero_temperature(model):
  first = generation.generate(model, ["def "], max_new_tokens=12, temperature=0.0)
  again = generation.generate(model, ["def "], max_new_tokens=12, temperature=0.0, seed=7)
  assert first.tokens == again.tokens and len(first.tokens[0]) > 0
  # Temperature -> 0 is greedy: with a tiny temperature, sampling picks the argmax every time.
  cold = generation.generate(model, ["def "], max_new_tokens=12, temperature=1e-6, seed=5)
  assert cold.tokens == first.tokens


def test_batched_prompts_give_the_same_greedy_tokens_as_each_alone(model):
  prompts = ["import os\n", "def ", "class Message(object):\n    "]
  batched = generation.generate(model, prompts, max_new_tokens=10, temperature=0.0)
  for prompt, tokens in zip(prompts, batched.tokens, strict=True):
    alone = generation.generate(model, [prompt], max_new_tokens=10, temperature=0.0)
    assert alone.tokens[0] == tokens, prompt


def test_sampling_is_reproducible_per_seed_and_row(model):
  runs = [
    generation.generate(model, ["def ", "x"], max_new_tokens=16, temperature=1.0, seed=s)
    for s in (11, 11, 12)
  ]
  assert runs[0].tokens == runs[1].tokens
  assert runs[0].tokens != runs[2].tokens
  # Row 0's key does not depend on the other rows: alone it draws the same tokens.
  alone = generation.generate(model, ["def "], max_new_tokens=16, temperature=1.0, seed=11)
  assert alone.tokens[0] == runs[0].tokens[0]


def _draws(logits_V: np.ndarray, sampling: sampling_lib.Sampling, n: int = 4000) -> np.ndarray:
  logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
  keys_B = jax.random.split(jax.random.key(0), n)
  return np.asarray(jax.jit(sampling_lib.sample, static_argnums=2)(logits_BV, keys_B, sampling))


def test_top_k_never_samples_outside_the_k_best():
  logits = np.random.default_rng(0).normal(size=64).astype(np.float32)
  best = set(np.argsort(-logits)[:5].tolist())
  draws = _draws(logits, sampling_lib.Sampling(temperature=2.0, top_k=5))
  assert set(draws.tolist()) == best  # only the 5 best, and (at temperature 2) all of them


def test_top_p_respects_its_nucleus():
  probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
  logits = np.log(probs)
  draws = _draws(logits, sampling_lib.Sampling(top_p=0.7))
  # The smallest set with mass >= 0.7 is {0, 1}; renormalised, token 0 has 0.5 / 0.8 = 0.625.
  assert set(draws.tolist()) == {0, 1}
  assert abs(np.mean(draws == 0) - 0.625) < 0.03
  assert set(_draws(logits, sampling_lib.Sampling(top_p=0.5)).tolist()) == {0}
  assert set(_draws(logits, sampling_lib.Sampling(top_p=1.0)).tolist()) == {0, 1, 2, 3}


def test_greedy_picks_the_argmax():
  logits = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), 3)
  picked = sampling_lib.sample(jnp.asarray(logits), keys, sampling_lib.Sampling(temperature=0.0))
  np.testing.assert_array_equal(picked, logits.argmax(-1))


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
    ({"temperature": -0.5}, "temperature=-0.5 is negative"),
    ({"top_k": -1}, "top_k=-1 must be an integer >= 0"),
  ],
)
def test_invalid_sampling_parameters_are_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
    sampling_lib.Sampling(**kwargs)


# --- bad input ---------------------------------------------------------------------------------


def test_workdir_without_checkpoints_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="has no checkpoints"):
    loading.load(str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # loading never creates anything


def test_corrupt_checkpoint_is_refused(workdir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  data = [p for p in (copy / "checkpoints" / "20" / "state").rglob("*") if p.is_file()]
  victim = max(data, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:-16] + b"\0" * 16)
  with pytest.raises(ValueError, match="checkpoint at step 20 fails its checksums"):
    loading.load(str(copy))
  assert loading.load(str(copy), step=10).step == 10


def test_missing_step_lists_the_available_steps(workdir):
  available = r"available steps: \[10, 20\]"
  with pytest.raises(ValueError, match=rf"--step 7 has no checkpoint .* {available}"):
    loading.load(workdir, step=7)


def test_prompt_errors_name_the_lengths(model):
  context = model.model_cfg.max_seq_len
  with pytest.raises(ValueError, match=f"prompt 1 is {context + 3} tokens .* context .* {context}"):
    generation.generate(model, ["ok", "x" * (context + 3)])
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    generation.generate(model, [""])


def test_stops_at_the_context_and_at_end_of_document(model):
  context = model.model_cfg.max_seq_len
  out = generation.generate(model, ["x" * (context - 3)], max_new_tokens=50, temperature=0.0)
  assert out.stop_reasons == ["context"] and len(out.tokens[0]) == 3
  # A model trained to end documents stops there: fake it by treating its first greedy token as
  # the end-of-document id.
  first = generation.generate(model, ["def "], max_new_tokens=1, temperature=0.0).tokens[0][0]
  out = model.engine.run(
    model.params,
    [model.tokenizer.encode("def ")],
    max_new_tokens=20,
    sampling=sampling_lib.Sampling(0.0),
    seed=0,
    eod_id=first,
  )
  assert out.stop_reasons == ["eod"] and out.tokens == [[]]


# --- sharding ----------------------------------------------------------------------------------


def test_params_and_cache_are_sharded_on_the_training_mesh(model, workdir):
  spec_embed = model.params["embed"]["table"].sharding.spec
  assert spec_embed == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert len(model.params["embed"]["table"].sharding.device_set) == 8
  # kv heads over tensor, batch over data x fsdp: a 2 x 2 x 2 mesh gives the same tokens.
  mesh_config = ml_collections.ConfigDict(
    {"data": 2, "fsdp": 2, "tensor": 2, "rules": model.config.mesh.rules}
  )
  other = loading.load(workdir, mesh_config=mesh_config)
  shape = {"stage": 1, "data": 2, "fsdp": 2, "context": 1, "expert": 1, "tensor": 2}
  assert other.params["embed"]["table"].sharding.mesh.shape == shape
  assert other.engine.cache_sharding.spec == jax.sharding.PartitionSpec(
    "stage", ("data", "fsdp", "expert"), None, "tensor", None
  )
  prompts = ["def ", "import "]
  ours = generation.generate(model, prompts, max_new_tokens=8, temperature=0.0)
  theirs = generation.generate(other, prompts, max_new_tokens=8, temperature=0.0)
  assert ours.tokens == theirs.tokens


def test_earlier_step_restores_other_params(model, workdir):
  early = loading.load(workdir, step=10)
  assert early.step == 10 and model.step == 20
  assert not np.array_equal(early.params["embed"]["table"], model.params["embed"]["table"])


# --- the meter, the eval hook and the CLI ------------------------------------------------------


def test_inference_meter_reports_throughput_bandwidth_and_energy(model):
  out = generation.generate(model, ["def ", "class "], max_new_tokens=8, temperature=0.0)
  stats = out.stats
  assert stats["generated_tokens"] == sum(map(len, out.tokens)) > 0
  for key in (
    "prefill_tokens_per_second",
    "decode_tokens_per_second",
    "time_to_first_token_s",
    "copy_bandwidth_bytes_per_second",
    "bandwidth_utilisation",
    "energy_kwh_per_1k_tokens",
  ):
    assert stats[key] > 0, key
  cfg = model.model_cfg
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
  assert stats["bytes_per_decode_step"] > param_bytes  # weights and the KV cache
  # forward FLOPs: 2 * (non-embedding + output layer) + attention at the mean context.
  assert stats["flops_per_generated_token"] > 2 * (26848 - 8256 + cfg.d_model * cfg.vocab_size)
  assert stats["energy_source"] in ("measured", "estimated")
  # An energy counter's span opens once the programs are compiled (the time's clock starts
  # there too): compiling for a new length is not the generation's energy.
  compiled_at_start = []
  longer = [model.tokenizer.encode("def " * 5)]
  model.engine.run(
    model.params, longer, max_new_tokens=3, sampling=sampling_lib.Sampling(0.0), seed=0,
    eod_id=None,
    on_start=lambda: compiled_at_start.append(model.engine.compile_seconds),
  )  # fmt: skip
  assert compiled_at_start == [model.engine.compile_seconds]
  # The decode rate counts the tokens decode steps made: the shortest prompt's first token came
  # with the prefill, within the time to the first token (it had counted: 8/7 of the rate).
  two = [model.tokenizer.encode("def "), model.tokenizer.encode("class ")]
  out = model.engine.run(
    model.params, two, max_new_tokens=4, sampling=sampling_lib.Sampling(0.0), seed=0, eod_id=None
  )
  assert (sum(map(len, out.tokens)), out.decode_tokens) == (8, 7)


def test_greedy_sample_is_the_greedy_continuation(model):
  text = generation.greedy_sample(model, "def ", 6)
  expected = generation.generate(model, ["def "], max_new_tokens=6, temperature=0.0).texts[0]
  assert text == "def " + expected
  assert generation.greedy_sample(model, "def ", 0) is None


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run(
    [sys.executable, "-m", "train.generate", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_cli_streams_and_prints_json_last(workdir, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("def \nclass \n")
  done = _cli(
    "--workdir",
    workdir,
    "--prompts_file",
    str(prompts),
    "--prompt",
    "import",
    "--max_new_tokens",
    "5",
    "--top_k",
    "5",
    "--seed",
    "1",
    "--json",
  )
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result["prompts"] == ["import", "def ", "class "] and len(result["texts"]) == 3
  for key in ("prefill_tokens_per_second", "decode_tokens_per_second", "energy_kwh_per_1k_tokens"):
    assert result[key] > 0
  bad = _cli("--workdir", workdir, "--prompt", "def ", "--top_p", "0")
  assert bad.returncode == 2 and "top_p=0.0 must be in (0, 1]" in bad.stderr
