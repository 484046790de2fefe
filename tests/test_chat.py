"""Supervised fine-tuning data: chat:PATH conversations, loss on assistant turns only."""

import json
import logging

import jax
import numpy as np
import pytest
import transformers
from cli_helpers import train_in_process

import input_pipeline
from configs import tiny
from input_pipeline import chat, errors
from models.config import ModelConfig
from train import loss
from train import state as state_lib
from train.cluster import mesh as mesh_lib

CHATML = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
  [
    {"role": "system", "content": "You answer in Python."},
    {"role": "user", "content": "Add one and two."},
    {"role": "assistant", "content": "print(1 + 2)"},
    {"role": "user", "content": "Now times four."},
    {"role": "assistant", "content": "print((1 + 2) * 4)"},
  ],
  [
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "print('hello')"},
  ],
]


def _chat_file(path, conversations, extra_lines=()):
  lines = [json.dumps({"messages": c}) for c in conversations] + list(extra_lines)
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _tokenizer(directory, eos: str = "<|endoftext|>") -> None:
  """A byte-level BPE tokenizer with a ChatML template, trained here and saved as HF files;
  ``eos="<|im_end|>"``: the template ends turns with its eos, as Qwen's instruct tokenizers do."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator([json.dumps(c) for c in CONVERSATIONS] * 20, trainer)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, eos_token=eos, additional_special_tokens=special[1:]
  )
  fast.chat_template = CHATML
  fast.save_pretrained(str(directory))


def test_assistant_turns_are_the_only_trainable_pieces():
  pieces = chat.Renderer(CHATML).pieces(CONVERSATIONS[0])
  assert "".join(text for text, _ in pieces) == chat.Renderer(CHATML).render(
    CONVERSATIONS[0], generation_prompt=False
  )
  trainable = [text for text, flag in pieces if flag]
  assert trainable == ["print(1 + 2)<|im_end|>\n", "print((1 + 2) * 4)<|im_end|>\n"]


def test_templates_get_the_special_tokens_transformers_gives_them(tmp_path):
  """A template that writes bos_token and ends assistant turns with eos_token (Llama 2, Mistral,
  Zephyr do) renders as transformers' apply_chat_template does; such a template had raised
  jinja's UndefinedError, and bos_token had rendered as nothing."""
  from input_pipeline import tokenizers

  template = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
  )
  _tokenizer(tmp_path)
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  theirs.bos_token, theirs.chat_template = "<|im_start|>", template
  theirs.save_pretrained(str(tmp_path))
  ours = tokenizers.HFTokenizer(tmp_path)
  renderer = chat.Renderer(ours.chat_template, ours.special_tokens)
  for conversation in CONVERSATIONS:
    for generation, messages in ((False, conversation), (True, conversation[:-1])):
      text = renderer.render(messages, generation_prompt=generation)
      expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation
      )
      assert text == expected and text.startswith("<|im_start|><|im_start|>")
  assert "print('hello')<|endoftext|><|im_end|>" in renderer.render(CONVERSATIONS[1], False)
  # The store's fingerprint follows the end-of-document token, which tokenizer_config.json names.
  theirs.eos_token = "<|im_end|>"
  theirs.save_pretrained(str(tmp_path))
  changed = tokenizers.HFTokenizer(tmp_path)
  assert changed.eod_id != ours.eod_id and changed.identity != ours.identity


def _config(tmp_path, source, tokenizer="byte"):
  config = tiny.get_config()
  config.data.source = f"chat:{source}"
  config.data.tokenizer = tokenizer
  config.data.cache_dir = str(tmp_path / "cache")
  config.data.validation_percent = 50
  config.data.seq_len = 32
  return config


def test_batches_weigh_only_assistant_tokens(tmp_path):
  _tokenizer(tmp_path / "tok")
  source = _chat_file(tmp_path / "chats.jsonl", CONVERSATIONS * 8)
  pipeline = input_pipeline.build(_config(tmp_path, source, f"hf:{tmp_path / 'tok'}"))
  assert pipeline.store.array_names[-1] == "loss_mask"
  batch = next(pipeline.train_batches(global_batch_size=8, process_index=0, process_count=1))
  tokenizer = pipeline.tokenizer
  trained = tokenizer.decode(batch["targets"][batch["weights"] > 0].tolist())
  ignored = tokenizer.decode(batch["targets"][(batch["weights"] == 0)].tolist())
  assert batch["weights"].sum() > 0
  for prompt in ("Add one and two.", "Say hello.", "You answer in Python."):
    assert prompt not in trained
  assert "print(" in trained and "user" not in trained
  assert "Add one" in ignored or "Say hello" in ignored or "Python" in ignored
  # The template's end of turn (<|im_end|>) is trained, and the eos after a final turn.
  targets = batch["targets"][batch["weights"] > 0].tolist()
  assert tokenizer.eod_id in targets and tokenizer.encode("<|im_end|>")[0] in targets


def test_the_end_of_document_token_is_trained_once(tmp_path):
  """After a final assistant turn the end-of-document token is trained, unless the template
  wrote that very token to end the turn (a Qwen instruct tokenizer: eos <|im_end|>), where it
  had been trained twice in a row."""
  from input_pipeline import store, tokenizers

  pieces = chat.Renderer(CHATML).pieces(CONVERSATIONS[0])
  for eos, trained in (("<|endoftext|>", 1), ("<|im_end|>", 0)):
    _tokenizer(tmp_path / f"tok{trained}", eos=eos)
    tokenizer = tokenizers.HFTokenizer(tmp_path / f"tok{trained}")
    ids, mask = store._masked_tokens(pieces, tokenizer)
    assert len(mask) == len(ids) + 1 and mask[-1] == trained, eos
    assert list(ids).count(tokenizer.encode("<|im_end|>")[0]) == 5  # one a turn


def test_prompt_tokens_get_no_gradient(tmp_path):
  source = _chat_file(tmp_path / "chats.jsonl", CONVERSATIONS * 8)
  config = _config(tmp_path, source)
  pipeline = input_pipeline.build(config)
  batch = next(pipeline.train_batches(global_batch_size=8, process_index=0, process_count=1))
  cfg = ModelConfig.from_config(config.model, seq_len=32, vocab_size=258)
  mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.logical_rules(config.mesh)
  import optax

  spec = state_lib.state_spec(cfg, optax.identity(), mesh, rules)
  params = state_lib.init_state(spec, cfg, optax.identity(), mesh, rules, 0)["params"]
  # FALLBACK_TEMPLATE marks no end of a turn: the end-of-document token after one is trained.
  assert pipeline.tokenizer.eod_id in batch["targets"][batch["weights"] > 0].tolist()
  # Changing the targets the mask leaves out changes neither the loss nor its gradient.
  other = dict(batch, targets=np.where(batch["weights"] > 0, batch["targets"], 7))
  grad = jax.grad(lambda p, b: loss.loss_sums(p, spec.graphdef, b)[0])
  for a, b in zip(
    jax.tree.leaves(grad(params, batch)), jax.tree.leaves(grad(params, other)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_templates_with_loop_controls_render_and_bad_ones_are_data_errors():
  """Loop controls, as transformers enables them (Cohere's templates use them); a template that
  does not parse, or fails on a conversation, is a DataError (a one-line error), not a jinja
  traceback."""
  template = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% endfor %}"
  )
  text = chat.Renderer(template).render(CONVERSATIONS[0], generation_prompt=False)
  assert text == "user: Add one and two.\nassistant: print(1 + 2)\n"
  with pytest.raises(errors.DataError, match="does not parse"):
    chat.Renderer("{% for m in messages %}")
  with pytest.raises(errors.DataError, match="failed on a conversation"):
    chat.Renderer("{{ messages[0]['content'] + 1 }}").render(CONVERSATIONS[0], False)


def test_lines_end_at_newlines_only(tmp_path):
  """U+2028, U+2029 and U+0085 are legal inside a JSON string (json.dumps(ensure_ascii=False)
  writes them raw): one record each, not lines cut in two; a line that is not UTF-8 is a bad
  line with its number."""
  text = "print(1)\u2028print(2)\u2029\x85"
  conversation = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": text}]
  raw = json.dumps({"messages": conversation}, ensure_ascii=False).encode() + b"\r\n"
  path = tmp_path / "chats.jsonl"
  path.write_bytes(raw * 3 + b'{"messages": "\xff"}\n')
  parsed = chat.read(f"chat:{path}", 0)
  assert parsed.conversations["train"] == [conversation] * 3 and parsed.identity["bad_lines"] == 1


def test_bad_lines_are_reported_and_no_assistant_is_an_error(tmp_path, caplog):
  source = _chat_file(
    tmp_path / "chats.jsonl",
    CONVERSATIONS * 4,
    extra_lines=['{"messages": [{"role": "robot", "content": "x"}]}', "not json", '{"msgs": []}'],
  )
  with caplog.at_level(logging.WARNING):
    parsed = chat.read(f"chat:{source}", 50)
  assert "3 bad lines skipped" in caplog.text
  assert "line 9: message 0 has no role" in caplog.text and "line 10: not JSON" in caplog.text
  assert sum(len(v) for v in parsed.conversations.values()) == 8
  users_only = [[{"role": "user", "content": "hi"}]]
  with pytest.raises(errors.DataError, match="no conversation .* has an assistant turn"):
    chat.read(f"chat:{_chat_file(tmp_path / 'users.jsonl', users_only * 3)}", 50)


@pytest.mark.slow
def test_fine_tuning_runs_end_to_end(tmp_path, caplog):
  source = _chat_file(tmp_path / "chats.jsonl", CONVERSATIONS * 16)
  caplog.set_level(logging.INFO, logger="loom")
  overrides = {
    "data.source": f"chat:{source}",
    "data.validation_percent": 25,
    "train.steps": 10,
  }
  report = train_in_process(tmp_path / "w", tmp_path / "cache", overrides)
  assert "eval at step 10" in caplog.text and report["eval/loss"] > 0
