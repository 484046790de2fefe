"""Hugging Face in and out, proved by logits: tiny random models built here with transformers."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from cli_helpers import REPO, train_env, train_in_process
from flax import nnx

from configs import default
from train.checkpoint.manager import CheckpointMismatchError
from train.config import ConfigError
from train.hf import exporting, importing
from train.hf.families import ConversionError
from train.inference import generation, loading
from train.inference.sampling import Sampling

SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
FAMILIES = {
  "llama": lambda: transformers.LlamaConfig(
    **SMALL,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 8.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 32,
    },
    rms_norm_eps=1e-5,
  ),
  "mistral": lambda: transformers.MistralConfig(
    **SMALL,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=256,
    sliding_window=None,
    rope_theta=5e5,
  ),  # fmt: skip
  "qwen2": lambda: transformers.Qwen2Config(
    **SMALL,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
  ),  # fmt: skip
  "qwen3": lambda: transformers.Qwen3Config(
    **SMALL,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
  ),  # fmt: skip
  "gpt2": lambda: transformers.GPT2Config(
    vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=128
  ),
}


def _text_ids(length: int, rows: int = 2, vocab: int = 300) -> np.ndarray:
  """Ids from real text: bytes of this file, folded into the vocabulary."""
  data = np.frombuffer(open(__file__, "rb").read(), np.uint8).astype(np.int64)
  return np.stack([data[i * 97 : i * 97 + length] % vocab for i in range(rows)])


def _hf_model(family: str, directory: str):
  torch.manual_seed(0)
  config = FAMILIES[family]()
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():  # random biases and norm scales, so that every tensor matters
    for name, param in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_" in name:
        param.add_(0.1 * torch.randn_like(param))
  model.save_pretrained(directory, safe_serialization=True)
  return model


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


def _loom_logits(workdir: str, ids: np.ndarray, mesh=None) -> np.ndarray:
  model = loading.load(workdir, mesh_config=mesh)
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

  def forward(params, tokens, positions):
    return nnx.merge(model.graphdef, params)(tokens, positions)

  with jax.set_mesh(model.mesh), nnx.logical_axis_rules(model.rules):
    logits = jax.jit(forward)(model.params, jnp.asarray(ids, jnp.int32), positions)
  return np.asarray(logits)


def _base(scan: bool, mesh: tuple[int, int, int] = (1, -1, 1)) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.scan_layers = scan
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  return config


@pytest.mark.parametrize(
  "family, scan, mesh",
  [
    ("llama", False, (1, -1, 1)),
    ("llama", True, (1, 4, 2)),
    ("mistral", True, (1, -1, 1)),
    ("qwen2", False, (1, 4, 2)),
    ("qwen3", True, (1, 4, 2)),
    ("gpt2", False, (1, 4, 2)),
    ("gpt2", True, (1, -1, 1)),
  ],
)
def test_import_and_export_keep_the_logits(family, scan, mesh, tmp_path):
  hf_dir, workdir, out_dir = (str(tmp_path / n) for n in ("hf", "loom", "out"))
  model = _hf_model(family, hf_dir)
  ids = _text_ids(48)
  expected = _hf_logits(model, ids)
  importing.import_checkpoint(hf_dir, workdir, _base(scan, mesh))
  got = _loom_logits(workdir, ids)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  # Back out, sharded into several files, and into transformers again.
  result = exporting.export_checkpoint(workdir, out_dir, max_shard_bytes=20_000)
  assert len(result["files"]) > 1 and os.path.isfile(os.path.join(out_dir, "config.json"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  np.testing.assert_allclose(_hf_logits(reloaded.eval(), ids), expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(tmp_path):
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "loom")
  model = _hf_model("qwen3", hf_dir)
  importing.import_checkpoint(hf_dir, workdir, _base(scan=True))
  prompt = _text_ids(7, rows=1)[0].tolist()
  with torch.no_grad():
    reference = model.generate(
      torch.as_tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None
    )[0, len(prompt) :].tolist()
  loom = loading.load(workdir)
  out = loom.engine.run(
    loom.params, [prompt], max_new_tokens=32, sampling=Sampling(0.0), seed=0, eod_id=None
  )
  assert out.tokens[0] == reference


def _tokenizer(directory: str, bos: bool = False) -> None:
  """A byte-level BPE tokenizer trained here on standard-library text, saved as HF files;
  ``bos``: with a BOS token its post-processor adds to every encoding, as Llama's does."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=290,
    special_tokens=["<|endoftext|>"] + ["<s>"] * bos,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is unknown
  )
  text = open(json.__file__).read().splitlines()
  tok.train_from_iterator(text, trainer)
  special = {"eos_token": "<|endoftext|>"}
  if bos:
    tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    special["bos_token"] = "<s>"
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **special)
  fast.save_pretrained(directory)


def test_hf_tokenizer_ids_equal_transformers(tmp_path):
  from input_pipeline.tokenizers import HFTokenizer

  _tokenizer(str(tmp_path))
  ours = HFTokenizer(tmp_path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  text = open(os.__file__).read()[:5000] + " naïve café ∑ 😀"
  assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
  assert ours.eod_id == theirs.eos_token_id
  assert ours.decode(ours.encode(text)) == text
  # Training documents are what transformers' tokenizer(text) gives: with a Llama-style BOS
  # where the post-processor adds one (the harness scores after it too), without one here.
  assert [list(ids) for ids in ours.encode_array([text])] == [theirs(text)["input_ids"]]
  _tokenizer(str(tmp_path / "bos"), bos=True)
  ours, theirs = (
    HFTokenizer(tmp_path / "bos"),
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "bos")),
  )
  assert ours.document_prefix == [theirs.bos_token_id]
  assert [list(ids) for ids in ours.encode_array([text])] == [theirs(text)["input_ids"]]


def test_the_tokenizer_travels_with_import_and_export(tmp_path):
  hf_dir, workdir, out_dir = (str(tmp_path / n) for n in ("hf", "loom", "out"))
  _hf_model("llama", hf_dir)
  _tokenizer(hf_dir)
  importing.import_checkpoint(hf_dir, workdir, _base(scan=False))
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["data"]["tokenizer"] == f"hf:{os.path.join(workdir, 'tokenizer')}"
  model = loading.load(workdir)
  result = generation.generate(model, ["def "], max_new_tokens=5, temperature=0.0)
  assert result.stats["generated_tokens"] <= 5
  exporting.export_checkpoint(workdir, out_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
  assert tokenizer("def f():", add_special_tokens=False)["input_ids"] == model.tokenizer.encode(
    "def f():"
  )
  # The imported work directory moved (its config names its tokenizer by the old absolute
  # path): the copy beside the checkpoint serves (loading it had failed: no such file).
  moved = str(tmp_path / "moved")
  os.rename(workdir, moved)
  assert loading.load(moved).tokenizer.encode("def f():") == model.tokenizer.encode("def f():")


def _bad(tmp_path, edit) -> str:
  hf_dir = str(tmp_path / "hf")
  _hf_model("llama", hf_dir)
  edit(hf_dir)
  return hf_dir


def _set_config(key, value):
  def edit(hf_dir):
    path = os.path.join(hf_dir, "config.json")
    config = json.load(open(path))
    config[key] = value
    json.dump(config, open(path, "w"))

  return edit


def _drop_tensor(hf_dir):
  from safetensors.numpy import load_file, save_file

  path = os.path.join(hf_dir, "model.safetensors")
  tensors = load_file(path)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda d: os.remove(os.path.join(d, "config.json")), "has no config.json"),
    (_set_config("model_type", "bert"), "model_type='bert' is not supported"),
    (_set_config("num_attention_heads", None), "config.json has no 'num_attention_heads'"),
    (_drop_tensor, "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    (
      _set_config("intermediate_size", 48),
      "(32, 64) does not fit Loom parameter 'mlp.down_kernel'",
    ),
  ],
)
def test_bad_checkpoints_are_one_line_errors_and_write_nothing(tmp_path, edit, message):
  """A ConversionError (one line, exit 2 in the command) and nothing written. The command itself
  runs on the case that fails half-way through, after the import has started writing."""
  hf_dir = _bad(tmp_path, edit)
  workdir = str(tmp_path / "loom")
  if "does not fit" in message:
    result = subprocess.run(
      [sys.executable, "-m", "train.convert", "import", hf_dir, f"--workdir={workdir}"],
      cwd=REPO,
      env=train_env(),
      capture_output=True,
      text=True,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
  else:
    with pytest.raises(ConversionError) as refused:
      importing.import_checkpoint(hf_dir, workdir, default.get_config())
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert refused.value.exit_code == 2
  assert not os.path.exists(workdir) and not os.path.exists(workdir + ".partial")


def test_a_source_without_rope_scaling_gets_none_whatever_the_run_config_says():
  """configs/llama_8b_131k.py scales RoPE (llama3): importing a model without scaling through it
  had kept that scaling, and the logits silently differed from transformers'."""
  from configs import llama_8b_131k
  from train.hf import families

  base = llama_8b_131k.get_config().model
  assert base.rope_scaling == "llama3"
  mistral = FAMILIES["mistral"]().to_dict()
  cfg = families.model_config_from_hf(mistral, "hf", base)
  assert (cfg.rope_scaling, cfg.rope_theta) == ("none", 5e5)
  llama = FAMILIES["llama"]().to_dict()
  assert families.model_config_from_hf(llama, "hf", base).rope_original_max_len == 32
  del llama["rope_parameters"]["low_freq_factor"]
  with pytest.raises(ConversionError, match="llama3 RoPE scaling has no low_freq_factor"):
    families.model_config_from_hf(llama, "hf", base)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
  hf_dir = str(tmp_path / "hf")
  _hf_model("llama", hf_dir)
  _tokenizer(hf_dir)
  _set_config("vocab_size", 200)(hf_dir)
  with pytest.raises(
    ConversionError, match="tokenizer.json has 290 tokens but .* vocab_size is 200"
  ):
    importing.import_checkpoint(hf_dir, str(tmp_path / "loom"), _base(scan=False))


@pytest.mark.slow
def test_training_starts_from_hf_weights_and_from_an_import(tmp_path, cache_dir):
  """init_from: the source decides the architecture and tokenizer; conflicts are named."""
  hf_dir, imported = str(tmp_path / "hf"), str(tmp_path / "imported")
  model = _hf_model("llama", hf_dir)
  _tokenizer(hf_dir)
  # One step at a negligible learning rate: the trained parameters are still the HF ones.
  still = {"train.steps": 1, "optim.learning_rate": 1e-12, "log.every": 1}
  run = str(tmp_path / "run")
  train_in_process(run, cache_dir, {**still, "checkpoint.init_from": f"hf:{hf_dir}"})
  config = json.load(open(os.path.join(run, "config.json")))
  assert (
    config["model"]["rope_scaling"] == "llama3" and config["data"]["tokenizer"] == f"hf:{hf_dir}"
  )
  out_dir = str(tmp_path / "out")
  exporting.export_checkpoint(run, out_dir)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  ids = _text_ids(32)
  np.testing.assert_allclose(_hf_logits(reloaded.eval(), ids), _hf_logits(model, ids), atol=1e-4)
  # An import's work directory is a source too, and is not itself resumable.
  importing.import_checkpoint(hf_dir, imported, _base(scan=True))
  from_import = str(tmp_path / "from_import")
  train_in_process(from_import, cache_dir, {**still, "checkpoint.init_from": f"loom:{imported}"})
  with pytest.raises(CheckpointMismatchError, match="holds imported weights") as refused:
    train_in_process(imported, cache_dir)
  assert refused.value.exit_code == 2
  conflict = {"checkpoint.init_from": f"hf:{hf_dir}", "model.d_model": 64}
  with pytest.raises(ConfigError, match="model.d_model=64 in the config, 32 in the source") as e:
    train_in_process(str(tmp_path / "conflict"), cache_dir, conflict)
  assert e.value.exit_code == 2
  # The tokenizer: SentencePiece to be trained on the run's data (configs/llama_1b.py's) gives
  # way to the source's; one the config names for good is a conflict.
  from cli_helpers import tiny_config

  from train import init_from

  source = {"checkpoint.init_from": f"loom:{imported}"}
  spm = tiny_config(cache_dir, {**source, "data.tokenizer": "sentencepiece"})
  assert init_from.adopt(spm).data.tokenizer == f"hf:{os.path.join(imported, 'tokenizer')}"
  other = tiny_config(cache_dir, {**source, "data.tokenizer": f"hf:{tmp_path}"})
  with pytest.raises(ConfigError, match="data.tokenizer='hf:.* in the config"):
    init_from.adopt(other)


def test_convert_commands_print_json(tmp_path):
  hf_dir, workdir, out_dir = (str(tmp_path / n) for n in ("hf", "loom", "out"))
  _hf_model("gpt2", hf_dir)

  def convert(*args):
    result = subprocess.run(
      [sys.executable, "-m", "train.convert", *args],
      cwd=REPO,
      env=train_env(),
      capture_output=True,
      text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])

  imported = convert("import", hf_dir, f"--workdir={workdir}", "--config=configs/tiny.py")
  assert imported["model_type"] == "gpt2" and imported["model_config"]["positions"] == "learned"
  exported = convert("export", f"--workdir={workdir}", out_dir, "--dtype=bfloat16")
  assert exported["files"] == ["model.safetensors"] and exported["model_type"] == "gpt2"
  assert json.load(open(os.path.join(out_dir, "config.json")))["torch_dtype"] == "bfloat16"
  assert ".loom-partial" not in os.listdir(out_dir)
  # OUT.partial: a user's folder there is refused and kept; an unfinished export's is replaced.
  again = tmp_path / "again"
  (again.parent / "again.partial").mkdir()
  (again.parent / "again.partial" / "notes.txt").write_text("mine")
  with pytest.raises(ConversionError, match="is not an unfinished output of Loom's"):
    exporting.export_checkpoint(workdir, str(again))
  assert (again.parent / "again.partial" / "notes.txt").read_text() == "mine"
  (again.parent / "again.partial" / ".loom-partial").touch()  # as an interrupted export left it
  exporting.export_checkpoint(workdir, str(again))
  assert not (again.parent / "again.partial").exists() and (again / "config.json").exists()
