"""Tokenizers: byte-level (the default, no files) and SentencePiece (trained here or loaded).

Byte-level ids: 0..255 are the UTF-8 bytes of the text, 256 is end-of-document (`eod_id`) and 257 is
padding (`pad_id`); vocab_size is 258. Decoding drops the special ids and undoes UTF-8, so
decode(encode(text)) == text for every str.

SentencePiece: a BPE model with identity normalisation, no dummy prefix, whitespace kept as is and
byte fallback, so source code (indentation, tabs, newlines, any Unicode) round-trips exactly. Its
eos id is the end-of-document id. A trained model is written next to the prepared stores, named by
a hash of everything that shaped it, and reused.

`identity` (kind, vocab size, model sha256) is part of the data fingerprint.
"""

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizerFile  # Hugging Face tokenizer.json files

from input_pipeline import errors
from input_pipeline.host import storage

_log = logging.getLogger(__name__)

TOKENIZERS = ("byte", "sentencepiece", "hf:<directory with tokenizer.json>")

# SentencePiece training reads at most this many characters of the train split: a few seconds on
# two cores for an 8k vocabulary, and enough text for stable merges.
SPM_TRAIN_CHARS = 4_000_000


class Tokenizer(Protocol):
  vocab_size: int
  eod_id: int
  pad_id: int
  identity: dict

  def encode(self, text: str) -> list[int]: ...

  def encode_array(self, texts: list[str]) -> list[np.ndarray]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes 0..255, eod 256, pad 257."""

  vocab_size = 258
  eod_id = 256
  pad_id = 257
  identity = {"kind": "byte", "vocab_size": 258}

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_array(self, texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(i for i in (int(i) for i in ids) if 0 <= i < 256)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model; eod is its eos id, padding its pad id (eod if it has none)."""

  def __init__(self, model_path):
    self.model_path = storage.absolute(model_path)
    proto = self.model_path.read_bytes()
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except RuntimeError as e:  # sentencepiece's parse failure
      raise errors.DataError(
        f"data.spm_model={os.fspath(model_path)!r} is not a SentencePiece model ({e}); give a "
        "*.model file (or data.tokenizer='hf:DIR' for a tokenizer.json)"
      ) from e
    self.vocab_size = int(self._sp.get_piece_size())
    if self._sp.eos_id() < 0:
      raise errors.DataError(
        f"SentencePiece model {self.model_path} has no eos piece; Loom uses it as the "
        "end-of-document id. Train it with eos_id >= 0."
      )
    self.eod_id = int(self._sp.eos_id())
    # Padding slots carry segment 0 and weight 0, so any id works when the model has no pad piece.
    self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eod_id
    self.identity = {
      "kind": "sentencepiece",
      "vocab_size": self.vocab_size,
      "model_sha256": hashlib.sha256(proto).hexdigest(),
    }

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_array(self, texts: list[str]) -> list[np.ndarray]:
    ids = self._sp.encode(texts, num_threads=os.cpu_count() or 1)
    return [np.asarray(x, np.int32) for x in ids]

  def decode(self, ids: Iterable[int]) -> str:
    # The model's vocabulary is padded past the pieces (configs/llama_1b.py: 128,256 rows for
    # 32,000 pieces); a sampled id beyond them decodes to nothing, as an unused row should.
    keep = [int(i) for i in ids if int(i) not in (self.eod_id, self.pad_id)]
    return self._sp.decode([i for i in keep if 0 <= i < self.vocab_size])


class HFTokenizer:
  """A Hugging Face ``tokenizer.json`` (byte-level BPE, SentencePiece-derived, Llama 3's), read
  with the ``tokenizers`` library. ``encode`` gives ``transformers``' ids with
  ``add_special_tokens=False``; a training document (``encode_array``) starts with what the
  post-processor puts first (Llama's BOS), as ``tokenizer(text)`` does, and packing appends the
  end-of-document id (the tokenizer's eos token).
  """

  def __init__(self, directory: Path):
    self.directory = Path(directory).expanduser()
    path = self.directory / "tokenizer.json"
    if not path.is_file():
      raise errors.DataNotFoundError(f"data.tokenizer='hf:{directory}': no such file {path}")
    try:
      self._tok = HFTokenizerFile.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
      raise errors.DataError(f"data.tokenizer='hf:{directory}': {path} cannot be read ({e})") from e
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    eos = self._special_token("eos_token")
    if eos is None:
      raise errors.DataError(
        f"data.tokenizer='hf:{directory}': neither tokenizer_config.json nor "
        "special_tokens_map.json names an eos_token, nor config.json an eos_token_id; Loom uses "
        "it as the end-of-document id"
      )
    self.eod_id = eos
    self.pad_id = self._special_token("pad_token")
    self.pad_id = self.eod_id if self.pad_id is None else self.pad_id
    self.bos_id = self._special_token("bos_token")
    self.chat_template = self._chat_template()
    self.special_tokens = self._special_token_texts()
    self.document_prefix = self._document_prefix()
    self.identity = {
      "kind": "hf",
      "vocab_size": self.vocab_size,
      "tokenizer_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
      # tokenizer_config.json decides these (the same tokenizer.json serves a base model and its
      # instruct variant with another eos): stored rows end with this eod id.
      "eod_id": self.eod_id,
      "pad_id": self.pad_id,
      "special_tokens": self.special_tokens,
      "document_prefix": self.document_prefix,  # stored documents start with these ids
    }

  def _chat_template(self) -> str | None:
    """tokenizer_config.json's chat_template (the "default" one of a list), or the
    chat_template.jinja file newer transformers write; None without one."""
    jinja = self.directory / "chat_template.jinja"
    if jinja.is_file():
      return jinja.read_text(encoding="utf-8")
    template = self._config().get("chat_template")
    if isinstance(template, list):
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default")
    return template if isinstance(template, str) else None

  def _config(self, name: str = "tokenizer_config.json") -> dict:
    """A JSON file of the directory ({} without one); one that is not a JSON object is an
    error."""
    path = self.directory / name
    if not path.is_file():
      return {}
    try:
      config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise errors.DataError(
        f"{path} is not JSON ({e}); give a Hugging Face tokenizer directory"
      ) from e
    if not isinstance(config, dict):
      raise errors.DataError(
        f"{path} is not a JSON object; give a Hugging Face tokenizer directory"
      )
    return config

  def _special_token_text(self, key: str) -> str | None:
    """As transformers reads it: tokenizer_config.json's (an explicit null included), else
    special_tokens_map.json's; for the eos alone, else the token of config.json's eos_token_id
    (GPT-2's directories name their end of text only there)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      config = self._config(name)
      if key in config:
        token = config[key]
        if isinstance(token, dict):  # {"content": "</s>", ...} in older files
          token = token.get("content")
        return token if isinstance(token, str) else None
    token_id = self._config("config.json").get(f"{key}_id") if key == "eos_token" else None
    if isinstance(token_id, list) and token_id:  # Llama 3.1 Instruct lists several ends
      token_id = token_id[0]
    return self._tok.id_to_token(token_id) if isinstance(token_id, int) else None

  def _special_token(self, key: str) -> int | None:
    token = self._special_token_text(key)
    return None if token is None else self._tok.token_to_id(token)

  def _special_token_texts(self) -> dict[str, str]:
    """The special tokens chat templates are given (transformers passes the same names)."""
    keys = (
      "bos_token",
      "eos_token",
      "unk_token",
      "pad_token",
      "sep_token",
      "cls_token",
      "mask_token",
    )
    found = {key: self._special_token_text(key) for key in keys}
    return {key: text for key, text in found.items() if text is not None}

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_special_tokens(self, text: str) -> list[int]:
    """As transformers' ``tokenizer.encode(text)`` (its default ``add_special_tokens=True``: a
    Llama tokenizer's post-processor adds BOS), unless ``text`` starts with the BOS text itself:
    how lm-eval's ``hf`` model encodes what it scores."""
    bos = self.special_tokens.get("bos_token") or self.special_tokens.get("eos_token")
    if bos and text.startswith(bos):
      return self.encode(text)
    return self._tok.encode(text, add_special_tokens=True).ids

  def _document_prefix(self) -> list[int]:
    """What the post-processor puts before a text (Llama's BOS; nothing for GPT-2's or Qwen's),
    found by encoding a probe with and without it."""
    plain = self._tok.encode("a", add_special_tokens=False).ids
    full = self._tok.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
      if full[start : start + len(plain)] == plain:
        return full[:start]
    return []

  def encode_array(self, texts: list[str]) -> list[np.ndarray]:
    """Training documents: each starts with what the post-processor puts before a text (BOS for
    Llama's tokenizers, as transformers' ``tokenizer(text)`` and the harness give it); packing
    ends each with the eod id."""
    encoded = self._tok.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(self.document_prefix + e.ids, np.int32) for e in encoded]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def encode_as_text_to_score(tokenizer, text: str) -> list[int]:
  """Ids of a prompt or of a text to score, as transformers' ``tokenizer(text)`` and lm-eval's
  ``hf`` model give them: with the tokenizer's special tokens (BOS first for Llama's); Loom's
  byte and SentencePiece tokenizers have none to add. Training documents: ``encode_array``."""
  with_special = getattr(tokenizer, "encode_with_special_tokens", None)
  return with_special(text) if with_special else tokenizer.encode(text)


def _sample_lines(documents: Iterable[str], max_chars: int) -> Iterator[str]:
  """Lines (newline kept) from the first documents, up to max_chars characters in all."""
  seen = 0
  for doc in documents:
    for line in doc.splitlines(keepends=True):
      yield line
      seen += len(line)
      if seen >= max_chars:
        return


def train_sentencepiece(
  documents: Iterable[str], vocab_size: int, model_path: Path, max_chars: int = SPM_TRAIN_CHARS
) -> Path:
  """Trains a BPE model on a bounded sample of documents and writes it atomically to model_path."""
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_sample_lines(documents, max_chars),
      model_writer=proto,
      vocab_size=vocab_size,
      model_type="bpe",
      # Source code must survive: keep every space, tab and newline, and fall back to bytes.
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,
      allow_whitespace_only_pieces=True,
      byte_fallback=True,
      character_coverage=1.0,
      user_defined_symbols=["\n"],
      max_sentence_length=1 << 16,
      unk_id=0,
      bos_id=-1,
      eos_id=1,
      pad_id=2,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise errors.DataError(
      f"SentencePiece training failed for data.spm_vocab_size={vocab_size} on the train split "
      f"(a vocabulary must exceed 256 byte pieces + 3 specials and fit the text): {e}"
    ) from e
  model_path.parent.mkdir(parents=True, exist_ok=True)
  storage.write_atomic(model_path, proto.getvalue())  # concurrent trainers each write a whole file
  return model_path


def vocab_size_from_config(data_config) -> int:
  """The vocabulary size the tokenizer of ``config.data`` will have, without preparing any data.

  Byte-level: 258. SentencePiece: the piece count of ``data.spm_model`` (read from the file), or
  ``data.spm_vocab_size`` for a model trained on the train split (training keeps it exact).
  """
  kind = data_config.tokenizer
  if kind == "byte":
    return ByteTokenizer.vocab_size
  if kind.startswith("hf:"):
    return HFTokenizer(Path(kind[3:])).vocab_size
  if kind != "sentencepiece":
    raise errors.DataError(f"unknown data.tokenizer={kind!r}; valid: {', '.join(TOKENIZERS)}")
  if data_config.spm_model:
    return _load_spm_model(data_config.spm_model).vocab_size
  _check_spm_vocab_size(int(data_config.spm_vocab_size))
  return int(data_config.spm_vocab_size)


def load_tokenizer(data_config) -> Tokenizer:
  """The tokenizer of ``config.data`` where it needs no data: byte, hf: or a given SentencePiece
  model (a SentencePiece model trained on the data comes with the prepared store)."""
  kind = data_config.tokenizer
  if kind == "sentencepiece" and not data_config.spm_model:
    raise errors.DataError("a trained SentencePiece model needs its data: use input_pipeline.build")
  return build_tokenizer(
    kind,
    spm_model=data_config.spm_model,
    spm_vocab_size=int(data_config.spm_vocab_size),
    source_identity={},
    train_documents=lambda: iter(()),
    cache_dir=storage.cache_path(data_config.cache_dir),
  )


def _load_spm_model(spm_model: str) -> SentencePieceTokenizer:
  path = storage.absolute(spm_model)
  if not path.is_file():
    raise errors.DataNotFoundError(f"data.spm_model={spm_model!r}: no such file {path}")
  return SentencePieceTokenizer(path)


def _check_spm_vocab_size(spm_vocab_size: int) -> None:
  if spm_vocab_size < 260:
    raise errors.DataError(
      f"data.spm_vocab_size={spm_vocab_size} is too small: byte fallback needs 256 pieces plus "
      "unk, eos, pad and newline (>= 260)"
    )


def build_tokenizer(
  kind: str,
  *,
  spm_model: str,
  spm_vocab_size: int,
  source_identity: dict,
  train_documents,
  cache_dir: Path,
) -> Tokenizer:
  """The tokenizer named by data.tokenizer; a SentencePiece model is trained once and cached.

  train_documents: a zero-argument callable returning the train split's documents (called only
  when a model must be trained).
  """
  if kind == "byte":
    return ByteTokenizer()
  if kind.startswith("hf:"):
    return HFTokenizer(Path(kind[3:]))
  if kind != "sentencepiece":
    raise errors.DataError(f"unknown data.tokenizer={kind!r}; valid: {', '.join(TOKENIZERS)}")
  if spm_model:
    return _load_spm_model(spm_model)
  _check_spm_vocab_size(spm_vocab_size)
  recipe = {"source": source_identity, "vocab_size": spm_vocab_size, "chars": SPM_TRAIN_CHARS}
  digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
  path = storage.absolute(cache_dir) / "tokenizers" / f"spm-{spm_vocab_size}-{digest}.model"
  if not path.is_file():
    _log.info("Training a SentencePiece model (vocab %d) -> %s", spm_vocab_size, path)
    train_sentencepiece(train_documents(), spm_vocab_size, path)
  return SentencePieceTokenizer(path)
