"""Mixtures of experts in and out of Hugging Face (Mixtral, Qwen3-MoE), proved by logits: tiny
random models built here with transformers, imported once per family for the whole file."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from model_configs import model_config
from safetensors import safe_open
from test_hf import _base, _hf_logits, _loom_logits, _set_config, _text_ids

from configs import default
from train import init_from
from train.config import ConfigError
from train.hf import exporting, importing
from train.hf.families import ConversionError
from train.inference import loading
from train.inference.sampling import Sampling

VOCAB = 300  # above the byte tokenizer's 258, which the run config keeps
SMALL = dict(
  vocab_size=VOCAB,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
  num_experts_per_tok=2,
  bos_token_id=None,
  eos_token_id=None,
)
FAMILIES = {
  # Mixtral renormalises its top-k weights; Qwen3-MoE here does not (norm_topk_prob=False).
  "mixtral": lambda: transformers.MixtralConfig(
    **SMALL, intermediate_size=48, num_local_experts=4, rope_theta=1e6
  ),
  "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
    **SMALL,
    intermediate_size=64,
    moe_intermediate_size=40,
    num_experts=4,
    head_dim=16,
    norm_topk_prob=False,
  ),
}
# (scan_layers, mesh as data, fsdp, tensor): scanned and unrolled, one of them on 8 devices.
LAYOUTS = {"mixtral": (True, (1, 4, 2)), "qwen3_moe": (False, (1, -1, 1))}


def _hf_moe_model(family: str):
  """A random model whose routing and experts matter: at transformers' init (std 0.02) the
  router's probabilities are nearly uniform and the experts move the logits by ~0.02; here the
  router is peaked and the experts move them by ~0.6 (logits ~0.5)."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](), dtype=torch.float32)
  d, f = model.config.hidden_size, model.model.layers[0].mlp.experts.down_proj.shape[-1]
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name:
        param.add_(0.1 * torch.randn_like(param))
      elif name.endswith("mlp.gate.weight"):
        param.normal_(std=2.0 / d**0.5)
      elif name.endswith("experts.gate_up_proj"):
        param.normal_(std=1.0 / d**0.5)
      elif name.endswith("experts.down_proj"):
        param.normal_(std=1.0 / f**0.5)
  return model.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """Per family: the HF model, its directory (save_pretrained) and a Loom import of it."""
  out = {}
  for family, (scan, mesh) in LAYOUTS.items():
    root = tmp_path_factory.mktemp(family)
    hf_dir, workdir = str(root / "hf"), str(root / "loom")
    model = _hf_moe_model(family)
    model.save_pretrained(hf_dir)
    importing.import_checkpoint(hf_dir, workdir, _base(scan, mesh))
    out[family] = (model, hf_dir, workdir)
  return out


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_is_not_trivial(imported, family):
  """Every expert is chosen by some token in every layer, and none by every token: the logits
  below prove the routing, not one fixed pair of experts."""
  model = imported[family][0]
  with torch.no_grad():
    router_logits = model(torch.as_tensor(_text_ids(48)), output_router_logits=True).router_logits
  for layer in router_logits:
    chosen = torch.topk(layer, 2, dim=-1).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=4)
    assert (counts > 0).all() and (counts < chosen.shape[0]).all(), counts


@pytest.mark.parametrize("family", FAMILIES)
def test_import_and_export_keep_the_logits(imported, family, tmp_path):
  model, _, workdir = imported[family]
  ids = _text_ids(48)
  expected = _hf_logits(model, ids)
  np.testing.assert_allclose(_loom_logits(workdir, ids), expected, atol=1e-4, rtol=0)
  # Out in the Hub's form (one tensor per expert), sharded, and into transformers again.
  out_dir = str(tmp_path / "out")
  result = exporting.export_checkpoint(workdir, out_dir, max_shard_bytes=40_000)
  assert result["model_type"] == family and len(result["files"]) > 1
  names = set(json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))["weight_map"])
  expert = "block_sparse_moe.experts.3.w2" if family == "mixtral" else "mlp.experts.3.down_proj"
  assert f"model.layers.1.{expert}.weight" in names
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
  assert reloaded.config.num_experts_per_tok == 2 and reloaded.config.router_aux_loss_coef == 0.005
  np.testing.assert_allclose(_hf_logits(reloaded.eval(), ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(imported, family):
  model, _, workdir = imported[family]
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


def test_transformers_fused_expert_tensors_import_too(imported, tmp_path):
  """save_pretrained(save_original_format=False) writes transformers' in-memory form: Mixtral's
  experts under mlp., gate and up in one [E, 2F, D] tensor."""
  model = imported["mixtral"][0]
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "loom")
  model.save_pretrained(hf_dir, save_original_format=False)
  with safe_open(os.path.join(hf_dir, "model.safetensors"), "np") as f:
    assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()  # noqa: SIM118 (no dict)
  importing.import_checkpoint(hf_dir, workdir, _base(scan=False))
  ids = _text_ids(24)
  np.testing.assert_allclose(_loom_logits(workdir, ids), _hf_logits(model, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("mlp_only_layers", [0], "mlp_only_layers=[0]: those layers have a dense MLP"),
    ("decoder_sparse_step", 2, "decoder_sparse_step=2: experts in one layer of every 2"),
    # transformers builds this one as a dense model: it had crashed with an AttributeError.
    ("num_local_experts", 0, "num_experts=0: a mixture of experts needs at least 1"),
  ],
)
def test_dense_layers_between_experts_are_refused(imported, tmp_path, key, value, message):
  hf_dir, workdir = str(tmp_path / "hf"), str(tmp_path / "loom")
  shutil.copytree(imported["qwen3_moe"][1], hf_dir)
  _set_config(key, value)(hf_dir)
  with pytest.raises(ConversionError) as refused:
    importing.import_checkpoint(hf_dir, workdir, default.get_config())
  assert message in str(refused.value) and "\n" not in str(refused.value)
  assert refused.value.exit_code == 2
  assert not os.path.exists(workdir) and not os.path.exists(workdir + ".partial")


def test_export_picks_the_family_or_names_what_none_expresses():
  def moe_model(**fields):
    moe = {**default.get_config().model.moe.to_dict(), "num_experts": 4, **fields.pop("moe", {})}
    sizes = dict(vocab_size=VOCAB, num_kv_heads=4, head_dim=8, max_seq_len=64)
    return model_config(**sizes, moe=moe, **fields)

  assert exporting.family_for(moe_model(), None).model_type == "mixtral"
  qwen = moe_model(qk_norm=True, moe={"norm_topk": False, "dispatch": "capacity"})
  assert exporting.family_for(qwen, {"model_type": "qwen3"}).model_type == "qwen3_moe"
  for fields, named in [
    ({"moe": {"router": "sigmoid"}}, "model.moe.router='sigmoid'"),
    ({"moe": {"shared_experts": 1}}, "model.moe.shared_experts=1"),
    ({"moe": {"norm_topk": False}}, "model.moe.norm_topk=False without model.qk_norm"),
  ]:
    with pytest.raises(ConversionError, match="matches no Hugging Face MoE family") as refused:
      exporting.family_for(moe_model(**fields), None)
    assert named in str(refused.value)


def test_export_refuses_a_gpt2_layout_that_gpt2_cannot_hold():
  """A GPT-2-shaped model with q/k norms, grouped kv heads or another head width had been
  written as GPT-2 anyway: the norms left out, or shapes transformers refuses to load."""
  gpt2 = dict(vocab_size=VOCAB, max_seq_len=64, positions="learned", norm="layer", mlp="gelu")
  gpt2 |= dict(use_bias=True, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8)
  assert exporting.family_for(model_config(**gpt2), None).model_type == "gpt2"
  for fields, named in [
    ({"qk_norm": True}, "model.qk_norm=True"),
    ({"num_kv_heads": 2}, "model.num_kv_heads=2 (GPT-2: one per head, 4)"),
    ({"head_dim": 16}, "model.head_dim=16 (GPT-2: d_model / num_heads = 8)"),
  ]:
    with pytest.raises(ConversionError, match="has GPT-2's layout but") as refused:
      exporting.family_for(model_config(**{**gpt2, **fields}), None)
    assert named in str(refused.value)


def test_init_from_takes_the_experts_from_hf_and_the_dispatch_from_the_run(imported):
  """The source decides the experts' shape; dispatch and loss weights stay the run's."""
  config = default.get_config()
  config.checkpoint.init_from = f"hf:{imported['qwen3_moe'][1]}"
  config.model.moe.dispatch, config.model.moe.balance_loss = "capacity", 0.0
  moe = init_from.adopt(config).model.moe
  assert (moe.num_experts, moe.expert_dim, moe.norm_topk) == (4, 40, False)
  assert (moe.dispatch, moe.balance_loss) == ("capacity", 0.0)
  config.model.moe.num_experts = 8
  with pytest.raises(ConfigError, match="model.moe.num_experts=8 in the config, 4 in the source"):
    init_from.adopt(config)
