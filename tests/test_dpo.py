"""Preference tuning: prefs:PATH pairs packed whole into rows, DPO / IPO / SimPO equal to TRL's
on a tiny transformers model imported into Loom, LoRA's reference, bad input, a run that learns."""

import dataclasses
import functools
import json
import logging
import math
import os

import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from cli_helpers import REPO, copy_run, read_metrics, train_env, train_in_process, train_losses
from flax import nnx
from jax.sharding import PartitionSpec
from test_chat import CHATML, _tokenizer
from test_hf import _base, _hf_model
from test_hf import _tokenizer as _hf_tokenizer

import input_pipeline
from configs import tiny
from input_pipeline import errors, packing, preference
from models import pipeline
from train import config as config_lib
from train import dpo, step, trainer
from train import programs as programs_lib
from train import state as state_lib
from train.checkpoint import manager as checkpoint_lib
from train.cluster import mesh as mesh_lib
from train.hf import families, importing
from train.hf.safetensors_io import HFCheckpoint
from train.inference import loading
from train.meter import flops

# Plain-string records (TRL's "standard" preference format); completions start with a space, so
# no BPE token straddles the prompt / completion boundary in either tokenization.
RECORDS = [
  {"prompt": "Add one and two.", "chosen": " print(1 + 2)", "rejected": " print(12)"},
  {"prompt": "Say hello.", "chosen": " print('hello')", "rejected": " hello"},
  {"prompt": "You answer in Python. Now times four.", "chosen": " x * 4", "rejected": " no"},
  {"prompt": "Name a list.", "chosen": " []", "rejected": " print((1 + 2) * 4) is not a list"},
  {"prompt": "Add.", "chosen": " 1 + 2", "rejected": " 3 +"},
]
BAD_LINES = [
  '{"prompt": "x", "chosen": " a"}',
  "not json",
  '{"prompt": 3, "chosen": " a", "rejected": " b"}',
  '{"prompt": "x", "chosen": "", "rejected": " b"}',
  '{"prompt": "", "chosen": " a", "rejected": " b"}',
]


def _prefs_file(path, records, extra_lines=()):
  path.write_text("\n".join([json.dumps(r) for r in records] + list(extra_lines)) + "\n")
  return str(path)


SEQ_LEN = 128
MAX_PAIRS = (SEQ_LEN + 1) // 4 + 1  # what dpo.Preference.from_config derives


def _prefs_config(tmp, source, tokenizer="byte", seq_len=SEQ_LEN):
  config = tiny.get_config()
  config.data.source = f"prefs:{source}"
  config.data.tokenizer = tokenizer
  config.data.cache_dir = str(tmp / "cache")
  config.data.validation_percent = 0
  config.data.seq_len = seq_len
  config.train.objective = "dpo"
  return config


def _all_rows(pipeline):
  """Every train row of the store, as stored ([R, seq_len + 1] arrays)."""
  return pipeline.store.read_rows("train", np.arange(pipeline.store.num_rows("train")))


def _sequences(rows) -> list[tuple[list[int], list[int]]]:
  """Each pair's (chosen, rejected) token ids, row by row: segments 2k - 1 and 2k."""
  tokens, segment_ids = rows[:2]
  pairs = []
  for tokens_W, seg_W in zip(tokens, segment_ids, strict=True):
    for s in range(1, int(seg_W.max()) + 1, 2):
      pairs.append((tokens_W[seg_W == s].tolist(), tokens_W[seg_W == s + 1].tolist()))
  return pairs


def test_pairs_are_packed_whole_into_rows_and_too_long_ones_are_counted():
  packer = packing.PairPacker(seq_len=11, pad_id=0, token_dtype=np.int32)
  pair = lambda n, m: (np.full(n, 5), np.ones(n), np.full(m, 6), np.ones(m))
  rows = [b for p in (pair(3, 4), pair(2, 2), pair(9, 9), pair(5, 2)) for b in packer.add(*p)]
  rows += list(packer.finish())
  tokens, segment_ids, positions, mask = (np.concatenate(x) for x in zip(*rows, strict=True))
  assert packer.too_long == 1 and packer.num_documents == 3 and tokens.shape == (2, 12)
  # Row 0: pair 1 (segments 1, 2) and pair 2 (3, 4), 11 of 12 slots; row 1: pair 4 alone.
  np.testing.assert_array_equal(segment_ids[0], [1, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 0])
  np.testing.assert_array_equal(positions[0], [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(segment_ids[1], [1] * 5 + [2] * 2 + [0] * 5)
  rejected = (segment_ids % 2 == 0) & (segment_ids > 0)
  assert set(tokens[segment_ids % 2 == 1]) == {5} and set(tokens[rejected]) == {6}


def test_chat_records_render_with_the_template_and_weigh_only_completions(tmp_path):
  record = {
    "prompt": [{"role": "user", "content": "Say hello."}],
    "chosen": [{"role": "assistant", "content": "print('hello')"}],
    "rejected": "hello",
  }
  problem, parsed = preference.parse(json.dumps(record))
  assert problem == ""
  renderer = preference.PairRenderer(CHATML, tokenizer=None)
  prompt, chosen, rejected = renderer.texts(parsed)
  assert prompt == "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
  assert (chosen, rejected) == (prompt + "print('hello')<|im_end|>\n", prompt + "hello<|im_end|>\n")
  # Through the store: the byte tokenizer's own template (chat.FALLBACK_TEMPLATE).
  source = _prefs_file(tmp_path / "p.jsonl", [record, RECORDS[0]] * 4)
  pipeline = input_pipeline.build(_prefs_config(tmp_path, source))
  batch = packing.make_batch(*_all_rows(pipeline))
  decode = pipeline.tokenizer.decode
  trained = decode(batch["targets"][batch["weights"] > 0].tolist())
  ignored = decode(batch["targets"][batch["weights"] == 0].tolist())
  assert trained == ("print('hello')\n\nhello\n\n print(1 + 2) print(12)") * 4
  assert "### user:\nSay hello." in ignored and "Add one and two." in ignored
  # Every pair's two sequences share a row: segments 2k - 1 and 2k, both weighted.
  for seg_L, w_L in zip(batch["segment_ids"], batch["weights"], strict=True):
    weighted = sorted({int(s) for s in seg_L[w_L > 0]})
    assert weighted == list(range(1, len(weighted) + 1)) and len(weighted) % 2 == 0


def test_bad_records_are_reported_with_line_numbers_and_none_valid_is_an_error(tmp_path, caplog):
  source = _prefs_file(tmp_path / "p.jsonl", RECORDS, BAD_LINES)
  with caplog.at_level(logging.WARNING):
    parsed = preference.read(f"prefs:{source}", 0)
  assert len(parsed.records["train"]) == len(RECORDS)
  assert "5 bad lines skipped" in caplog.text
  for text in (
    'line 6: no "rejected"',
    "line 7: not JSON",
    'line 8: "prompt" is neither a string nor a list of messages',
    'line 9: "chosen" is empty',
    'line 10: "prompt" is empty',
  ):
    assert text in caplog.text
  too_long = _prefs_config(tmp_path, source, seq_len=16)  # byte ids: every pair > 17 tokens
  fits = r"none of the 5 train pairs fits a row of data.seq_len \+ 1 = 17 tokens"
  with pytest.raises(errors.DataError, match=fits):
    input_pipeline.build(too_long)
  only_bad = _prefs_file(tmp_path / "bad.jsonl", [], BAD_LINES)
  with pytest.raises(errors.DataError, match="no valid preference record in .*bad.jsonl") as e:
    preference.read(f"prefs:{only_bad}", 0)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "change, message",
  [
    ({"train.objective": "ppo"}, r"train.objective='ppo' is not one of \('lm', 'dpo', 'grpo'\)"),
    ({"data.source": "stdlib"}, "train.objective='dpo' needs preference data, not data.source"),
    ({"train.objective": "lm"}, "holds preference pairs, which train.objective='lm'"),
    ({"dpo.loss": "kto"}, r"dpo.loss='kto' is not one of \('sigmoid', 'ipo', 'simpo'\)"),
    ({"dpo.beta": 0.0}, "dpo.beta=0.0 must be > 0"),
    ({"dpo.label_smoothing": 0.5}, r"dpo.label_smoothing=0.5 must be in \[0, 0.5\)"),
    ({"dpo.loss": "ipo", "dpo.label_smoothing": 0.1}, "has no meaning for dpo.loss='ipo'"),
    ({"train.loss_chunk": 16}, "train.loss_chunk=16 is not supported with train.objective='dpo'"),
    ({"dpo.loss": "simpo", "dpo.simpo_gamma": math.nan}, "dpo.simpo_gamma=nan: must be a finite"),
    ({"optim.learning_rate": math.inf}, "optim.learning_rate=inf: must be a finite number"),
  ],
)
def test_bad_dpo_configs_are_one_line_errors(tmp_path, change, message):
  config = _prefs_config(tmp_path, tmp_path / "p.jsonl")
  for key, value in change.items():
    group, name = key.split(".")
    config[group][name] = value
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(config)
  assert "\n" not in str(e.value)


def test_the_reference_copy_is_sharded_like_the_policy_and_lora_or_simpo_need_none(tmp_path):
  config = _prefs_config(tmp_path, tmp_path / "p.jsonl")
  config.mesh.fsdp, config.mesh.tensor = 4, 2
  resolved = config_lib.validate(config)
  spec = programs_lib.jit_programs(config, resolved.mesh, resolved.rules, resolved.model_cfg).spec
  assert jax.tree.structure(spec.abstract["reference"]) == jax.tree.structure(
    spec.abstract["params"]
  )
  assert spec.shardings["reference"] == spec.shardings["params"]
  assert any(
    s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(spec.shardings["reference"])
  )
  for key, value in (("model.lora_rank", 4), ("dpo.loss", "simpo")):
    other = _prefs_config(tmp_path, tmp_path / "p.jsonl")
    group, name = key.split(".")
    other[group][name] = value
    resolved = config_lib.validate(other)
    spec = programs_lib.jit_programs(other, resolved.mesh, resolved.rules, resolved.model_cfg).spec
    assert "reference" not in spec.abstract, key


# --- parity with TRL: the same tiny transformers model (policy) and a perturbed copy (reference).


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """The HF policy and reference, their Loom parameters, and the Loom batch of RECORDS."""
  tmp = tmp_path_factory.mktemp("dpo_hf")
  _tokenizer(tmp / "tok")
  policy = _hf_model("llama", str(tmp / "policy"))
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp / "policy"), dtype=torch.float32
  ).eval()
  torch.manual_seed(1)
  with torch.no_grad():
    for param in reference.parameters():
      param.add_(0.05 * torch.randn_like(param))
  reference.save_pretrained(str(tmp / "reference"), safe_serialization=True)
  base = _base(scan=False)
  mesh, rules = mesh_lib.make_mesh(base.mesh), mesh_lib.logical_rules(base.mesh)
  loom = {}
  for name in ("policy", "reference"):
    checkpoint = HFCheckpoint(str(tmp / name))
    model_cfg = importing.model_config(checkpoint, base)
    spec = state_lib.state_spec(model_cfg, optax.identity(), mesh, rules)
    family = families.family_of(checkpoint.config, checkpoint.path)
    loom[name] = importing.load_params(checkpoint, family, spec, model_cfg)
  source = _prefs_file(tmp / "p.jsonl", RECORDS)
  pipeline = input_pipeline.build(_prefs_config(tmp, source, f"hf:{tmp / 'tok'}"))
  return {
    "tmp": tmp,
    "hf": (policy, reference),
    "loom": loom,
    "graphdef": spec.graphdef,
    "mesh": (mesh, rules),
    "rows": _all_rows(pipeline),
    "batch": packing.make_batch(*_all_rows(pipeline)),
    "tokenizer": transformers.AutoTokenizer.from_pretrained(str(tmp / "tok")),
  }


def _loom_pairs(models, settings):
  """Loom's per-pair terms of RECORDS, in file order: dict of [pairs] arrays."""
  mesh, rules = models["mesh"]
  terms_fn = functools.partial(dpo.pair_terms, graphdef=models["graphdef"], settings=settings)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    terms, _ = jax.jit(terms_fn)(
      models["loom"]["policy"], models["loom"]["reference"], batch=models["batch"]
    )
  valid, loss, chosen_reward, rejected_reward, chosen, rejected = map(np.asarray, terms)
  assert valid.sum() == len(RECORDS)
  pick = lambda x: x[valid]  # row-major = file order (validation_percent = 0, first fit)
  return {
    "loss": pick(loss),
    "rewards/chosen": pick(chosen_reward),
    "rewards/rejected": pick(rejected_reward),
    "logps/chosen": pick(chosen),
    "logps/rejected": pick(rejected),
  }


@pytest.fixture(scope="module")
def trl_runs(models):
  """TRL's DPOTrainer (sigmoid and IPO) on the same models and records: per pair and batch."""
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer

  policy, reference = models["hf"]
  out = {}
  for loss in ("sigmoid", "ipo"):
    args = DPOConfig(
      output_dir=str(models["tmp"] / f"trl_{loss}"),
      beta=0.5,
      loss_type=[loss],
      report_to="none",
      max_length=None,
      use_cpu=True,
      bf16=False,  # TRL's configs default to bf16, which its accelerator applies to the reference
    )
    dpo_trainer = DPOTrainer(
      model=policy,
      ref_model=reference,
      args=args,
      train_dataset=Dataset.from_list(RECORDS),
      processing_class=models["tokenizer"],
    )
    mode = "train" if dpo_trainer.model.training else "eval"
    rows, metrics = [], dpo_trainer._metrics[mode]
    examples = [dpo_trainer.train_dataset[i] for i in range(len(RECORDS))]
    with torch.no_grad():
      for example in examples:
        inputs = dpo_trainer.data_collator([example])
        value = float(dpo_trainer._compute_loss(dpo_trainer.model, inputs, False))
        row = {key: metrics[key][-1] for key in ("rewards/chosen", "rewards/rejected")}
        row.update({key: metrics[key][-1] for key in ("logps/chosen", "logps/rejected")})
        row["loss"] = value
        rows.append(row)
      batch_loss = float(
        dpo_trainer._compute_loss(dpo_trainer.model, dpo_trainer.data_collator(examples), False)
      )
    means = {key: metrics[key][-1] for key in dpo.METRICS}
    per_pair = {key: np.array([r[key] for r in rows]) for key in rows[0]}
    out[loss] = {"pairs": per_pair, "loss": batch_loss, "means": means, "examples": examples}
  out["trainer"] = dpo_trainer  # its _prepare_dataset tokenizes other records and tokenizers
  return out


# Conversations (TRL's "conversational" format), and a plain prompt that ends in a space.
CHAT_PAIRS = [
  {
    "prompt": [{"role": "system", "content": "You answer in Python."},
               {"role": "user", "content": "Add one and two."}],
    "chosen": [{"role": "assistant", "content": "print(1 + 2)"}],
    "rejected": [{"role": "assistant", "content": "3"}],
  },
  {
    "prompt": [{"role": "user", "content": "Say hello."}],
    "chosen": [{"role": "assistant", "content": "print('hello')"}],
    "rejected": [{"role": "assistant", "content": "hello"}],
  },
]  # fmt: skip
SPACED = [{"prompt": "Add one and two: ", "chosen": "print(1 + 2)", "rejected": "3"}]


def test_pairs_are_tokenized_as_trl_tokenizes_them(models, trl_runs, tmp_path):
  """TRL's own tokenization (DPOTrainer._prepare_dataset) of conversations (nothing after the
  template's end of turn: Loom had added an end-of-document token), of plain text with a BOS
  tokenizer (Loom had left BOS out) and of a prompt ending in a space (the boundary moves to
  where the ids part): the same sequences, and the same completion tokens weighted."""
  from datasets import Dataset

  trainer = trl_runs["trainer"]
  _hf_tokenizer(str(tmp_path / "bos"), bos=True)
  _tokenizer(tmp_path / "instruct", eos="<|im_end|>")  # turns end with the eos (Qwen's)
  cases = {
    "chat": (CHAT_PAIRS, tmp_path / "instruct"),
    "bos": (RECORDS[:2] + SPACED, tmp_path / "bos"),
  }
  for name, (records, tokenizer_dir) in cases.items():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    theirs = trainer._prepare_dataset(Dataset.from_list(records), tokenizer, trainer.args, name)
    examples = [theirs[i] for i in range(len(records))]
    source = _prefs_file(tmp_path / f"{name}.jsonl", records)
    config = _prefs_config(tmp_path / name, source, f"hf:{tokenizer_dir}")
    rows = _all_rows(input_pipeline.build(config))
    want = [
      (e["prompt_ids"] + e["chosen_ids"], e["prompt_ids"] + e["rejected_ids"]) for e in examples
    ]
    assert _sequences(rows) == want, name
    batch = packing.make_batch(*rows)
    weighted = batch["targets"][batch["weights"] > 0].tolist()
    assert weighted == [t for e in examples for t in e["chosen_ids"] + e["rejected_ids"]], name
    if name == "bos":
      assert want[0][0][0] == tokenizer.bos_token_id  # BOS first
  # Where the template's end of turn is not the eos (<|im_end|> against <|endoftext|>), Loom
  # ends each completion with the eos as well, where its sampler stops; TRL adds nothing.
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(models["tmp"] / "tok"))
  theirs = trainer._prepare_dataset(Dataset.from_list(CHAT_PAIRS), tokenizer, trainer.args, "base")
  source = _prefs_file(tmp_path / "base.jsonl", CHAT_PAIRS)
  rows = _all_rows(
    input_pipeline.build(_prefs_config(tmp_path / "base", source, f"hf:{models['tmp'] / 'tok'}"))
  )
  eos = [tokenizer.eos_token_id]
  want = [
    (e["prompt_ids"] + e["chosen_ids"] + eos, e["prompt_ids"] + e["rejected_ids"] + eos)
    for e in (theirs[i] for i in range(len(CHAT_PAIRS)))
  ]
  assert _sequences(rows) == want


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl(models, trl_runs, loss):
  trl = trl_runs[loss]
  # The same token ids: Loom's rows hold TRL's prompt + completion (+ eos) sequences, in order.
  want = [
    (e["prompt_ids"] + e["chosen_ids"], e["prompt_ids"] + e["rejected_ids"])
    for e in trl["examples"]
  ]
  assert _sequences(models["rows"]) == want
  settings = dpo.Preference(
    beta=0.5, loss=loss, label_smoothing=0.0, simpo_gamma=0.0, max_pairs=MAX_PAIRS
  )
  ours = _loom_pairs(models, settings)
  for key, value in trl["pairs"].items():
    np.testing.assert_allclose(ours[key], value, atol=1e-4, rtol=0, err_msg=key)
  assert abs(ours["logps/chosen"]).min() > 1  # real log-probs, not zeros
  assert abs(ours["rewards/chosen"] - ours["rewards/rejected"]).max() > 1e-2
  # The objective's batch loss and metrics (sums over pairs / pairs) equal TRL's batch means.
  mesh, rules = models["mesh"]
  objective = functools.partial(
    dpo.objective, graphdef=models["graphdef"], chunk=0, z_loss=0.0, settings=settings
  )
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    _, (loss_sum, pairs, _, sums) = jax.jit(objective)(
      models["loom"]["policy"], batch=models["batch"], reference=models["loom"]["reference"]
    )
  assert float(pairs) == len(RECORDS)
  np.testing.assert_allclose(float(loss_sum) / len(RECORDS), trl["loss"], atol=1e-4, rtol=0)
  for key in dpo.METRICS:
    np.testing.assert_allclose(float(sums[key]) / len(RECORDS), trl["means"][key], atol=1e-4)


@pytest.mark.parametrize("loss, smoothing, gamma", [("sigmoid", 0.2, 0.0), ("simpo", 0.1, 0.3)])
def test_smoothed_dpo_and_simpo_equal_their_formulas_on_trl_log_probs(
  models, trl_runs, loss, smoothing, gamma
):
  """TRL 1.16's "sigmoid" has no label smoothing and SimPO lives in its CPO trainer: these two
  are checked against their formulas in torch, on TRL's own sequence log-probs and lengths."""
  trl = trl_runs["sigmoid"]
  beta = 0.5
  chosen = torch.tensor(trl["pairs"]["logps/chosen"], dtype=torch.float64)
  rejected = torch.tensor(trl["pairs"]["logps/rejected"], dtype=torch.float64)
  ref_chosen = chosen - torch.tensor(trl["pairs"]["rewards/chosen"], dtype=torch.float64) / beta
  ref_rejected = (
    rejected - torch.tensor(trl["pairs"]["rewards/rejected"], dtype=torch.float64) / beta
  )
  lengths = [(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in trl["examples"]]
  chosen_len, rejected_len = (
    torch.tensor(x, dtype=torch.float64) for x in zip(*lengths, strict=True)
  )
  logsig = torch.nn.functional.logsigmoid
  if loss == "sigmoid":
    logits = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
  else:
    chosen_reward, rejected_reward = beta * chosen / chosen_len, beta * rejected / rejected_len
    logits = chosen_reward - rejected_reward - gamma
  want = -(1 - smoothing) * logsig(logits) - smoothing * logsig(-logits)
  settings = dpo.Preference(beta, loss, smoothing, gamma, max_pairs=MAX_PAIRS)
  ours = _loom_pairs(models, settings)
  np.testing.assert_allclose(ours["loss"], want.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours["rewards/chosen"], chosen_reward.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(ours["rewards/rejected"], rejected_reward.numpy(), atol=1e-4, rtol=0)


def test_micro_batches_give_the_same_dpo_update(models):
  """Pairs stay in their rows, so k micro-batches sum the same pair losses and counts."""
  batch = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in models["batch"].items()}
  settings = dpo.Preference(0.5, "sigmoid", 0.1, 0.0, max_pairs=MAX_PAIRS)
  mesh, rules = models["mesh"]
  policy, reference = models["loom"]["policy"], models["loom"]["reference"]
  results = []
  for k in (1, 2):
    objective = functools.partial(dpo.objective, reference=reference, settings=settings)
    grads = jax.jit(step.gradients, static_argnums=(1, 3, 6))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      results.append(grads(policy, models["graphdef"], batch, k, 0, 0.0, objective))
  (loss_1, pairs_1, grads_1, _, means_1), (loss_2, pairs_2, grads_2, _, means_2) = results
  assert float(pairs_1) == float(pairs_2) == len(RECORDS)
  np.testing.assert_allclose(float(loss_2), float(loss_1), rtol=1e-6)
  for key in dpo.METRICS:
    np.testing.assert_allclose(float(means_2[key]), float(means_1[key]), rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_2), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  assert optax.tree.norm(grads_1) > 0


# --- LoRA: the reference is the same weights with the adapters off; only adapters train.


@pytest.mark.slow
def test_lora_reference_is_the_base_model_and_only_adapters_change(tmp_path):
  config = _prefs_config(tmp_path, _prefs_file(tmp_path / "p.jsonl", RECORDS * 4))
  config.model.lora_rank = 4
  config.model.lora_targets = ("q", "k", "v", "out", "gate", "up", "down")
  config.optim.learning_rate = 0.05
  resolved = config_lib.validate(config)
  mesh, rules, model_cfg = resolved.mesh, resolved.rules, resolved.model_cfg
  pipeline = input_pipeline.build(config)
  built = trainer.build_steps(config, mesh, rules, model_cfg)
  jitted = built.programs
  assert "reference" not in jitted.spec.abstract  # no second copy of the weights
  state = state_lib.init_state(jitted.spec, model_cfg, jitted.tx, mesh, rules, 0)
  before = dict(jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state["params"])))
  batches = pipeline.train_batches(global_batch_size=8, process_index=0, process_count=1)
  first = None
  for _ in range(3):
    batch = input_pipeline.to_global(next(batches), jitted.batch_sharding)
    state, metrics = built.compiled_step(state, batch)
    first = first or {k: float(v) for k, v in metrics.items()}
  # Step 1: the policy is its reference (B = 0), so every reward is exactly zero.
  assert first["train/rewards/chosen"] == 0 and first["train/rewards/margins"] == 0
  assert first["train/pairs"] > 0 and math.isclose(first["train/loss"], math.log(2), rel_tol=1e-6)
  assert float(metrics["train/rewards/margins"]) != 0
  moved = 0
  for path, value in jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state["params"])):
    name = jax.tree_util.keystr(path)
    if "lora" in name:
      moved += not np.array_equal(value, before[path])
    else:
      np.testing.assert_array_equal(value, before[path], err_msg=name)
  assert moved > 0
  # The reference log-probs equal those of the base model built without adapters at all.
  base_cfg = dataclasses.replace(model_cfg, lora_rank=0)
  base_spec = state_lib.state_spec(base_cfg, optax.identity(), mesh, rules)
  base_params = _without_adapters(state["params"])
  batch = packing.make_batch(*_all_rows(pipeline))
  logps = jax.jit(dpo.sequence_logps, static_argnums=(1, 3))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    ref = logps(dpo.adapters_off(state["params"]), jitted.spec.graphdef, batch, MAX_PAIRS)[0]
    base = logps(base_params, base_spec.graphdef, batch, MAX_PAIRS)[0]
    policy = logps(state["params"], jitted.spec.graphdef, batch, MAX_PAIRS)[0]
  np.testing.assert_allclose(np.asarray(ref), np.asarray(base), atol=1e-5, rtol=0)
  assert np.abs(np.asarray(policy) - np.asarray(base)).max() > 1e-3  # the adapters did learn


def _without_adapters(tree):
  if not isinstance(tree, dict):
    return tree
  return {k: _without_adapters(v) for k, v in tree.items() if "lora" not in k}


# --- a short run: rewards/accuracies rise on checkable preferences, and resume is exact.


def _arithmetic(path, count=160):
  """Sums: the chosen answer is right, the rejected one wrong (a checkable preference)."""
  rng = np.random.default_rng(0)
  records = []
  for _ in range(count):
    a, b = (int(x) for x in rng.integers(0, 10, 2))
    wrong = (a + b + int(rng.integers(1, 9))) % 19
    records.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(wrong)})
  return _prefs_file(path, records)


@pytest.mark.slow
def test_a_dpo_run_learns_the_preferred_answers_and_resumes_exactly(tmp_path):
  overrides = {
    "data.source": f"prefs:{_arithmetic(tmp_path / 'sums.jsonl')}",
    "data.tokenizer": "byte",
    "train.objective": "dpo",
    "dpo.beta": 0.5,
    "train.steps": 16,
    "log.every": 1,
    "checkpoint.every": 8,
    "train.spike_policy": "off",
    "log.sample_tokens": 0,
  }
  workdir = str(tmp_path / "run")
  train_in_process(workdir, tmp_path / "cache", overrides)
  records = [r for r in read_metrics(workdir) if "train/loss" in r and "event" not in r]
  accuracies = [r["train/rewards/accuracies"] for r in records]
  assert accuracies[0] == 0  # step 1: the policy is the reference, no pair is preferred yet
  # Deterministic on CPU; measured 0.27 over the first four steps, 0.80 over the last four.
  assert (
    np.mean(accuracies[-4:]) >= 0.7 and np.mean(accuracies[-4:]) > np.mean(accuracies[:4]) + 0.3
  ), accuracies
  assert records[-1]["train/rewards/margins"] > 0 and records[-1]["train/loss"] < math.log(2)
  evals = [r for r in read_metrics(workdir) if "eval/loss" in r]
  assert [r["step"] for r in evals] == [10, 16] and evals[0]["eval/pairs"] > 0
  assert all(0 <= r["eval/rewards/accuracies"] <= 1 for r in evals)
  resumed = copy_run(workdir, tmp_path / "resumed", 16)
  report = train_in_process(resumed, tmp_path / "cache", overrides)
  assert report["restarted_from_step"] == 8  # the reference came back from the checkpoint
  # The meter counts the reference model's forward pass (2 FLOPs a weight) beside the policy's
  # forward and backward (6): 8 a weight, plus attention.
  cfg = loading.load(workdir, 16).model_cfg
  seq = tiny.get_config().data.seq_len
  expected = flops.train_flops_per_token(cfg, seq) + flops.forward_flops_per_token(cfg, seq)
  assert report["flops_per_token"] == expected
  assert train_losses(read_metrics(resumed)) == train_losses(read_metrics(workdir))
  # The reference serves inference; SimPO keeps none, so its resume is refused in one line (no
  # Orbax tree error), and a run without one has no reference to load.
  assert loading.load(workdir, 8, weights="reference").step == 8
  simpo = copy_run(workdir, tmp_path / "simpo", 16)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match="other parts .* reference"):
    train_in_process(simpo, tmp_path / "cache", {**overrides, "dpo.loss": "simpo"})
  assert sorted(os.listdir(os.path.join(simpo, "checkpoints"))) == ["8"]
  # Inference needs the tokenizer, not the pairs (which a prefs: run's tokenizer never depends
  # on): the run loads with its data file gone, as it does after the store's tokenization
  # changes (its data fingerprint with it).
  os.rename(tmp_path / "sums.jsonl", tmp_path / "moved.jsonl")
  assert loading.load(workdir, 16).tokenizer.eod_id == 256


def test_a_run_without_a_reference_copy_has_none_to_load(tiny_run):
  with pytest.raises(ValueError, match="holds no 'reference' weights: only a DPO or GRPO run"):
    loading.load(tiny_run[0], weights="reference")


@pytest.mark.slow
def test_the_dpo_demonstration_prefers_the_checkable_answers(tmp_path):
  """python -m train.rl.digits_dpo as a user runs it (one CPU device): rewards/accuracies rises
  from where the reference stands, and the held-out greedy answers become the preferred ones.
  Measured: accuracies 0.03 at step 1, 1.00 from step 20; held-out exact match 0.00 (the
  reference) -> 0.90 at step 60."""
  import re
  import subprocess
  import sys

  result = subprocess.run(
    [sys.executable, "-m", "train.rl.digits_dpo", f"--workdir={tmp_path / 'dpo'}"],
    cwd=REPO,
    env=train_env(1),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  accuracies = [
    r["train/rewards/accuracies"]
    for r in read_metrics(tmp_path / "dpo")
    if "train/rewards/accuracies" in r
  ]
  assert accuracies[0] < 0.6 and min(accuracies[-10:]) > 0.9, accuracies
  exact = [float(x) for x in re.findall(r"held-out greedy exact match (\S+)", result.stdout)]
  assert len(exact) == 7 and exact[0] < 0.2 and exact[-1] > 0.5, result.stdout


@pytest.mark.parametrize("form", ["all_gather", "ring"])
def test_a_context_axis_gives_the_same_dpo_update(models, form):
  """Each row's length split over a context axis of 2 (× fsdp 4): the pairs' sequence
  log-probabilities are summed by segment in the row's own order, so the loss, the pair count
  and the gradients equal the unsplit mesh's."""
  settings = dpo.Preference(0.5, "sigmoid", 0.1, 0.0, max_pairs=MAX_PAIRS)
  base = _base(scan=False)
  # An empty fourth row: 4 rows split over fsdp 4.
  batch = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in models["batch"].items()}
  results = []
  for context in (1, 2):
    config = base.copy_and_resolve_references()
    config.mesh.context, config.mesh.fsdp = context, 8 // context
    config.model.attention_context = form
    mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.logical_rules(config.mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      policy, reference = (
        jax.device_put(models["loom"][name], jax.sharding.NamedSharding(mesh, PartitionSpec()))
        for name in ("policy", "reference")
      )
      # The same weights; the model config names the context form.
      cfg = dataclasses.replace(nnx.merge(models["graphdef"], policy).cfg, attention_context=form)
      graphdef = state_lib.state_spec(cfg, optax.identity(), mesh, rules).graphdef
      objective = functools.partial(dpo.objective, reference=reference, settings=settings)
      grads = jax.jit(step.gradients, static_argnums=(1, 3, 6))
      results.append(grads(policy, graphdef, batch, 1, 0, 0.0, objective))
  (loss_1, pairs_1, grads_1, _, _), (loss_2, pairs_2, grads_2, _, _) = results
  assert float(pairs_1) == float(pairs_2) == len(RECORDS)
  np.testing.assert_allclose(float(loss_2), float(loss_1), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_2), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_pipeline_stages_give_the_same_dpo_update(models, monkeypatch):
  """The policy and reference imported with scanned layers, the layers split over 2 pipeline
  stages (× fsdp 2 × tensor 2, a microbatch per stage): the pairs' loss, count and gradients
  equal the unstaged mesh's (the model pipelines its layers inside the forward pass; the pairs
  are summed from whole-batch log-probabilities)."""
  settings = dpo.Preference(0.5, "sigmoid", 0.1, 0.0, max_pairs=MAX_PAIRS)
  batch = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in models["batch"].items()}
  results, pipelined = [], []
  run = pipeline.run
  monkeypatch.setattr(pipeline, "run", lambda *a, **k: pipelined.append(1) or run(*a, **k))
  for stage in (1, 2):
    config = _base(scan=True, mesh=(1, 2, 2) if stage > 1 else (1, -1, 1))
    config.mesh.stage = stage
    mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.logical_rules(config.mesh)
    loom = {}
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      for name in ("policy", "reference"):
        checkpoint = HFCheckpoint(str(models["tmp"] / name))
        model_cfg = importing.model_config(checkpoint, config)
        spec = state_lib.state_spec(model_cfg, optax.identity(), mesh, rules)
        family = families.family_of(checkpoint.config, checkpoint.path)
        loom[name] = importing.load_params(checkpoint, family, spec, model_cfg)
      objective = functools.partial(dpo.objective, reference=loom["reference"], settings=settings)
      grads = jax.jit(step.gradients, static_argnums=(1, 3, 6))
      args = (loom["policy"], spec.graphdef, batch, 1, 0, 0.0, objective)
      results.append(grads(*args))
      assert bool(pipelined) == (stage > 1)  # traced through models/pipeline.py when staged
  (loss_1, pairs_1, grads_1, _, _), (loss_2, pairs_2, grads_2, _, _) = results
  assert float(pairs_1) == float(pairs_2) == len(RECORDS)
  np.testing.assert_allclose(float(loss_2), float(loss_1), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_2), strict=True):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
