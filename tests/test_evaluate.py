"""The lm-eval harness on Loom checkpoints: scores equal a hand computation from the forward pass,
do not move with the batch size or the mesh, equal the harness's own ``hf`` model on imported
weights; the command writes DIR/eval/<step>.json and metrics lines, offline, from local tasks."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import REPO, copy_run, train_env
from flax import nnx

from configs import tiny
from train import trainer
from train.inference import harness, loading

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness_tasks")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the shipped tasks read local files only

PAIRS = [  # (context, continuation): uneven lengths, a trailing space, an empty context
  ("def __init__(self", "):"),
  ("import os\nimport ", "sys"),
  ("for i in range(", "10):\n    print(i)"),
  ("x = ", "1"),
  ("", "class A:"),
  ("while True:\n    ", "break"),
  ("return self.", "name"),
]


@pytest.fixture(scope="module")
def workdir(tiny_run) -> str:
  """The session's tiny run (read-only: the command's test works on a copy)."""
  return tiny_run[0]


@pytest.fixture(scope="module")
def model(workdir) -> loading.Model:
  return loading.load(workdir)


@pytest.fixture(scope="module")
def scores_at_batch_4(model) -> list[tuple[float, bool]]:
  return harness.loom_lm(model, 4).loglikelihood([_Request(*p) for p in PAIRS])


class _Request:
  def __init__(self, *args):
    self.args = args


def _by_hand(model, context: str, continuation: str) -> tuple[float, bool]:
  """Sum of log p(continuation | context) from one unpadded forward pass on one device."""
  ctx, cont = harness.encode_pair(model.tokenizer, context, continuation)
  tokens = np.array(ctx + cont, np.int32)[None]
  params = jax.device_put(model.params, jax.devices()[0])
  logits = nnx.merge(model.graphdef, params)(
    jnp.asarray(tokens[:, :-1]), jnp.arange(tokens.shape[1] - 1)[None]
  )
  logprobs = np.asarray(jax.nn.log_softmax(logits[0], axis=-1), np.float64)
  rows = np.arange(len(ctx) - 1, tokens.shape[1] - 1)
  targets = tokens[0, len(ctx) :]
  greedy = bool((logprobs[rows].argmax(-1) == targets).all())
  return float(logprobs[rows, targets].sum()), greedy


def test_loglikelihoods_equal_a_hand_computation_at_any_batch_size(model):
  expected = [_by_hand(model, *pair) for pair in PAIRS]
  for batch_size in (1, 3, 16):
    got = harness.loom_lm(model, batch_size).loglikelihood([_Request(*p) for p in PAIRS])
    for (value, greedy), (want, want_greedy) in zip(got, expected, strict=True):
      assert value == pytest.approx(want, abs=1e-4) and greedy == want_greedy
  assert len({round(v, 3) for v, _ in expected}) == len(PAIRS)  # distinct scores: no mix-ups


def test_each_evals_scorer_reuses_the_compiled_program(model):
  """A run that evaluates tasks at each eval makes a Scorer each time, for new parameters: the
  scoring program, and each row length compiled for it, is the process's one."""
  import dataclasses

  later = dataclasses.replace(model, params=jax.tree.map(lambda x: x * 1.0, model.params), step=9)
  first, second = harness.Scorer(model, 4), harness.Scorer(later, 4)
  pairs = [harness.encode_pair(model.tokenizer, *pair) for pair in PAIRS]
  assert first._score is second._score
  scores = first.score(pairs)
  compiled = first._score._cache_size()  # (other tests of this process may have added shapes)
  assert [v for v, _ in second.score(pairs)] == pytest.approx([v for v, _ in scores])
  assert first._score._cache_size() == compiled  # the second eval compiled nothing


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 8, 1)])
def test_loglikelihoods_do_not_depend_on_the_mesh(workdir, model, scores_at_batch_4, mesh):
  import ml_collections

  config = ml_collections.ConfigDict(dict(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]))
  config.rules = model.config.mesh.rules
  other = loading.load(workdir, mesh_config=config)
  got = harness.loom_lm(other, 4).loglikelihood([_Request(*p) for p in PAIRS])
  np.testing.assert_allclose([v for v, _ in got], [v for v, _ in scores_at_batch_4], atol=1e-4)


def test_rolling_loglikelihood_covers_every_token_once(model):
  lm = harness.loom_lm(model, 4)
  short = "def f(x):\n    return x\n"
  # A text shorter than the context: every token given the end-of-document token and the rest.
  (rolling,) = lm.loglikelihood_rolling([_Request(short)])
  assert rolling == pytest.approx(_by_hand(model, "", short)[0], abs=1e-4)
  # A text several contexts long is scored in windows whose log-likelihoods add up.
  long_text = open(os.__file__).read()[:3000]
  assert len(model.tokenizer.encode(long_text)) > 2 * model.model_cfg.max_seq_len
  (total,) = lm.loglikelihood_rolling([_Request(long_text)])
  assert np.isfinite(total) and total < rolling


def test_generate_until_stops_at_the_stop_string(model):
  from train.inference import generation

  lm = harness.loom_lm(model, 4)
  kwargs = {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}
  prompts = ["import ", "def ", "class "]
  got = lm.generate_until([_Request(p, kwargs) for p in prompts])
  greedy = generation.generate(model, prompts, max_new_tokens=12, temperature=0.0).texts
  assert got == [text.split("\n")[0] for text in greedy]


def _evaluate(workdir, *args):
  command = [sys.executable, "-m", "train.evaluate", f"--workdir={workdir}", *args]
  env = dict(train_env(), HF_DATASETS_OFFLINE="1")
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_command_runs_local_tasks_and_writes_results(workdir, tmp_path):
  workdir = copy_run(workdir, tmp_path / "run")  # the command writes eval/ and metrics lines
  tasks = "--tasks=loom_python_mc,loom_python_gen,loom_python_text"
  result = _evaluate(workdir, tasks, f"--include_path={TASKS}", "--limit=6")
  assert result.returncode == 0, result.stderr[-3000:]
  last = json.loads(result.stdout.strip().splitlines()[-1])
  step = 20  # the latest checkpoint
  assert last["step"] == step and last["requests"] > 0 and last["requests_per_second"] > 0
  metrics = last["metrics"]
  assert 0 <= metrics["harness/loom_python_mc/acc"] <= 1
  assert 0 <= metrics["harness/loom_python_gen/exact_match"] <= 1
  assert metrics["harness/loom_python_text/bits_per_byte"] > 0
  saved = json.load(open(os.path.join(workdir, "eval", f"{step}.json")))
  assert saved["metrics"] == metrics and saved["n-samples"]["loom_python_mc"]["effective"] == 6
  # Another evaluation of the step goes beside it, never over it.
  from train.inference import harness

  assert harness.write(workdir, saved, metrics_lines=False).endswith(f"eval/{step}.2.json")
  assert json.load(open(os.path.join(workdir, "eval", f"{step}.json"))) == saved
  # A training run's eval of a step it redid replaces the one of the trajectory it dropped.
  path = harness.write(workdir, saved, metrics_lines=False, keep_earlier=False)
  assert path.endswith(f"eval/{step}.json")
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {"step": step, **metrics} in lines
  # An unknown task names itself and the remedy; nothing is written.
  before = open(os.path.join(workdir, "metrics.jsonl")).read()
  bad = _evaluate(workdir, "--tasks=no_such_task", f"--include_path={TASKS}")
  assert bad.returncode == 2
  assert "unknown harness task(s) ['no_such_task']" in bad.stderr and "--include_path" in bad.stderr
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == before


@pytest.mark.slow
def test_scores_equal_the_harness_hf_model_on_imported_weights(tmp_path):
  """The same requests through lm-eval's own ``hf`` model (transformers on CPU torch) and
  through Loom's adapter on the imported weights: equal within 1e-4. The tokenizer adds BOS, as
  Llama's do: lm-eval scores every context after it (Loom had scored them without)."""
  from lm_eval.models.huggingface import HFLM
  from test_hf import _base, _hf_model, _tokenizer

  from train.hf import importing

  hf_dir, loom_dir = str(tmp_path / "hf"), str(tmp_path / "loom")
  _hf_model("llama", hf_dir)
  _tokenizer(hf_dir, bos=True)
  importing.import_checkpoint(hf_dir, loom_dir, _base(scan=False))
  requests = [_Request(*pair) for pair in PAIRS]
  ours = harness.loom_lm(loading.load(loom_dir), 4).loglikelihood(requests)
  theirs = HFLM(pretrained=hf_dir, device="cpu", batch_size=1, dtype="float32")
  expected = theirs.loglikelihood(requests)
  np.testing.assert_allclose([v for v, _ in ours], [v for v, _ in expected], atol=1e-4, rtol=0)
  assert [g for _, g in ours] == [g for _, g in expected]
  rolling = [_Request(open(json.__file__).read()[:1500])]
  np.testing.assert_allclose(
    harness.loom_lm(loading.load(loom_dir), 4).loglikelihood_rolling(rolling),
    theirs.loglikelihood_rolling(rolling),
    atol=1e-3,
  )
  # train.generate's prompts get BOS as transformers' tokenizer(prompt) gives it, and the
  # text it prints is what the tokens add to the prompt's.
  import torch

  from train.inference import generation

  prompt = "def loads(s"
  ids = theirs.tokenizer(prompt, return_tensors="pt").input_ids
  assert ids[0, 0].item() == theirs.tokenizer.bos_token_id
  with torch.no_grad():
    expected = theirs.model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
  ours = generation.generate(loading.load(loom_dir), [prompt], max_new_tokens=6, temperature=0)
  assert ours.tokens[0] == expected[0, ids.shape[1] :].tolist()
  assert (
    ours.texts[0] == theirs.tokenizer.decode(expected[0], skip_special_tokens=True)[len(prompt) :]
  )


@pytest.mark.slow
def test_harness_tasks_run_at_each_eval_during_training(tmp_path, cache_dir):
  config = tiny.get_config()
  config.data.cache_dir = cache_dir
  config.train.steps, config.train.eval_every = 10, 5
  config.log.progress = False
  config.harness.tasks = ("loom_python_mc",)
  config.harness.include_path = TASKS
  config.harness.limit = 4
  workdir = str(tmp_path / "run")
  report = trainer.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "eval"))) == ["10.json", "5.json"]
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  harness_steps = [line["step"] for line in lines if "harness/loom_python_mc/acc" in line]
  assert harness_steps == [5, 10]
  assert 0 <= report["harness/loom_python_mc/acc"] <= 1


def test_local_tasks_are_loaded_without_indexing_lm_evals_own(tmp_path):
  """Tasks that an include path defines load from that folder's index alone (lm-eval's own
  ~14,700 take seconds to index); a group there, whose members may be lm-eval's, or a name the
  folder lacks takes lm-eval's index with the folder on top."""
  from train.inference import tasks as task_index

  local = task_index.manager_for(["loom_python_mc", "loom_python_text"], TASKS)
  assert local.all_tasks == ["loom_python_gen", "loom_python_mc", "loom_python_text"]
  folder = tmp_path / "tasks"
  folder.mkdir()
  for name in ("python_mc.yaml", "python_mc.jsonl", "data.py"):
    (folder / name).write_text(open(os.path.join(TASKS, name)).read())
  (folder / "suite.yaml").write_text("group: my_suite\ntask:\n  - loom_python_mc\n  - arc_easy\n")
  assert task_index.defined_there(["loom_python_mc"], str(folder))
  assert not task_index.defined_there(["my_suite"], str(folder))  # a group: lm-eval's index
  # (The same index as the refused in-training tasks' below: one build of it in this process.)
  both = task_index.manager_for(["loom_python_mc", "arc_easy"], TASKS)
  assert {"loom_python_mc", "arc_easy"} <= set(both.all_tasks) and len(both.all_tasks) > 1000
  assert task_index.unknown(["loom_python_mc", "arc_easy", "nope"], TASKS) == ["nope"]


def test_run_tasks_starts_no_process_and_scores_as_simple_evaluate(model, monkeypatch):
  """No subprocess (lm-eval's environment report runs ``pip list`` and ``git``), and the same
  results as ``lm_eval.simple_evaluate`` with the same seeds and few-shot settings."""
  import lm_eval

  from train.inference import tasks as task_index

  names = ["loom_python_mc", "loom_python_gen"]
  started = []

  class Refused(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
      started.append(args)
      raise OSError(f"a subprocess during run_tasks: {args}")

  with monkeypatch.context() as patch:
    patch.setattr(subprocess, "Popen", Refused)
    ours = harness.run_tasks(model, names, include_path=TASKS, limit=5, num_fewshot=1, seed=3)
  assert started == []
  theirs = lm_eval.simple_evaluate(
    model=harness.loom_lm(model, 16),
    tasks=names,
    num_fewshot=1,
    limit=5,
    task_manager=task_index.manager_for(names, TASKS),
    log_samples=False,
    random_seed=3,
    numpy_random_seed=3,
    torch_random_seed=3,
    fewshot_random_seed=3,
    bootstrap_iters=0,
  )
  assert ours["metrics"] == harness.flatten(theirs) and ours["n-shot"] == theirs["n-shot"]
  assert ours["n-shot"] == {"loom_python_mc": 1, "loom_python_gen": 1}


def test_unknown_in_training_tasks_are_refused_before_any_work(tmp_path):
  from train import config as config_lib

  config = tiny.get_config()
  config.harness.tasks = ("loom_python_mc", "not_a_task")
  config.harness.include_path = TASKS
  with pytest.raises(config_lib.ConfigError, match=r"unknown task\(s\) \['not_a_task'\]"):
    config_lib.validate(config, workdir=str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
