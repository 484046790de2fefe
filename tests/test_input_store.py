"""The prepared store and tokenizers: fingerprints, reuse, atomicity, corruption, round trips."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest

import input_pipeline
from configs.default import get_config
from input_pipeline import pipeline, sources, store, tokenizers

STDLIB = Path(sysconfig.get_paths()["stdlib"])
JSON_GLOB = str(STDLIB / "json" / "*.py")


def _config(cache_dir, **data):
  c = get_config()
  c.data.cache_dir = str(cache_dir)
  c.data.source = f"files:{JSON_GLOB}"
  c.data.seq_len = 32
  c.data.validation_percent = 20
  for key, value in data.items():
    setattr(c.data, key, value)
  return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  """A small SentencePiece model trained on the json package (vocab 400)."""
  texts = [p.read_text() for p in sorted((STDLIB / "json").glob("*.py"))]
  path = tmp_path_factory.mktemp("spm") / "small.model"
  return tokenizers.train_sentencepiece(texts, 400, path)


def test_manifest_describes_the_store(cache):
  pipe = input_pipeline.build(_config(cache))
  m = pipe.manifest
  assert m["fingerprint"] == pipe.fingerprint == pipe.store.path.name
  assert m["format_version"] == store.FORMAT_VERSION
  assert m["seq_len"] == 32 and m["tokenizer"] == {"kind": "byte", "vocab_size": 258}
  assert m["source"] == f"files:{JSON_GLOB}"
  assert m["inputs"]["source"]["dataset"].startswith("loom_text_files/files_")
  assert m["splits"]["train"]["rows"] > 100 and m["splits"]["validation"]["rows"] > 0
  assert m["packing_efficiency"] > 0.99
  for name, meta in m["arrays"].items():
    array = np.load(pipe.store.path / name, mmap_mode="r")
    assert list(array.shape) == meta["shape"] and str(array.dtype) == meta["dtype"]
  tokens = np.load(pipe.store.path / store.shard_name("train", "tokens", 0))
  assert tokens.dtype == np.uint16 and tokens.shape[1] == 33
  assert m["shards"]["train"] == [m["splits"]["train"]["rows"]]  # a small store: one shard


def test_second_build_reuses_the_store(cache, monkeypatch):
  first = input_pipeline.build(_config(cache))

  def fail(*args, **kwargs):
    raise AssertionError("the store was packed again")

  monkeypatch.setattr(store, "_write_split", fail)
  again = input_pipeline.build(_config(cache))
  assert again.fingerprint == first.fingerprint and again.store.path == first.store.path


def test_fingerprint_changes_with_seq_len_tokenizer_and_files(cache, spm_model, tmp_path):
  base = input_pipeline.build(_config(cache)).fingerprint
  longer = input_pipeline.build(_config(cache, seq_len=48)).fingerprint
  spm = input_pipeline.build(
    _config(cache, tokenizer="sentencepiece", spm_model=str(spm_model))
  ).fingerprint
  corpus = tmp_path / "corpus"
  shutil.copytree(STDLIB / "json", corpus, ignore=shutil.ignore_patterns("__pycache__"))
  copied = input_pipeline.build(_config(cache, source=f"files:{corpus}/*.py")).fingerprint
  (corpus / "decoder.py").write_text((corpus / "decoder.py").read_text() + "\n# changed\n")
  changed = input_pipeline.build(_config(cache, source=f"files:{corpus}/*.py")).fingerprint
  assert copied == base  # same relative paths and contents: same data, same fingerprint
  assert len({base, longer, spm, changed}) == 4


def test_interrupted_preparation_is_not_reused(tmp_path, monkeypatch):
  cfg = _config(tmp_path)
  calls = {"n": 0}
  original = store._NpyWriter.append

  def crash_midway(self, rows):
    calls["n"] += 1
    if calls["n"] == 5:
      raise RuntimeError("simulated crash mid-write")
    original(self, rows)

  monkeypatch.setattr(store._NpyWriter, "append", crash_midway)
  monkeypatch.setattr(store, "_ENCODE_CHUNK", 1)
  monkeypatch.setattr(input_pipeline.packing, "_BLOCK_TOKENS", 256)
  with pytest.raises(RuntimeError, match="simulated crash"):
    input_pipeline.build(cfg)
  assert list((tmp_path / "stores").iterdir()) == []  # neither a final store nor a temporary
  monkeypatch.undo()
  pipe = input_pipeline.build(cfg)
  assert pipe.manifest["splits"]["train"]["rows"] > 100


def test_killed_preparation_leftover_is_ignored_and_cleaned(tmp_path):
  cfg = _config(tmp_path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  stores = tmp_path / "stores"
  leftover = stores / f".tmp.{dead.pid}.deadbeef.{os.uname().nodename}"
  leftover.mkdir(parents=True)
  (leftover / "train_tokens.npy").write_bytes(b"partial")
  pipe = input_pipeline.build(cfg)
  assert not leftover.exists()
  assert [p.name for p in stores.iterdir()] == [pipe.fingerprint]


def test_concurrent_preparations_agree(tmp_path):
  cfg = _config(tmp_path)
  source = sources.from_spec(cfg.data.source, cfg.data, tmp_path)
  results, errors = [], []

  def prepare():
    try:
      results.append(store.prepare(source, tokenizers.ByteTokenizer(), 32, tmp_path))
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=prepare) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert len({r.path for r in results}) == 1
  assert [p.name for p in (tmp_path / "stores").iterdir()] == [results[0].fingerprint]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "manifest", "shape"])
def test_corrupt_store_is_refused_and_left_in_place(tmp_path, damage):
  cfg = _config(tmp_path)
  path = input_pipeline.build(cfg).store.path
  tokens = path / store.shard_name("train", "tokens", 0)
  if damage == "flip_byte":
    data = bytearray(tokens.read_bytes())
    data[-5] ^= 0xFF
    tokens.write_bytes(bytes(data))
  elif damage == "truncate":
    tokens.write_bytes(tokens.read_bytes()[:-100])
  elif damage == "manifest":
    (path / "manifest.json").write_text("{not json")
  else:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["splits"]["train"]["rows"] += 1
    (path / "manifest.json").write_text(json.dumps(manifest))
  before = sorted((p.name, p.stat().st_size) for p in path.iterdir())
  if damage == "flip_byte":  # same size and shape: only the full check (sha256) sees it
    input_pipeline.build(cfg)
    cfg.data.verify_store = True
  with pytest.raises(ValueError, match=str(path)) as info:
    input_pipeline.build(cfg)
  assert "delete that directory" in str(info.value)
  assert sorted((p.name, p.stat().st_size) for p in path.iterdir()) == before


def test_byte_tokenizer_round_trips_stdlib_text():
  tok = tokenizers.ByteTokenizer()
  text = (STDLIB / "json" / "decoder.py").read_text() + "é ☃ \t\n"
  ids = tok.encode(text)
  assert max(ids) < 256 and tok.vocab_size == 258 and tok.eod_id == 256
  assert tok.decode(ids) == text
  assert tok.decode([*ids[:5], tok.eod_id, tok.pad_id]) == text[:5]


def test_sentencepiece_round_trips_stdlib_text(spm_model):
  tok = tokenizers.SentencePieceTokenizer(spm_model)
  assert tok.vocab_size == 400 and tok.identity["model_sha256"]
  unseen = (STDLIB / "textwrap.py").read_text() + "\n\t  é ☃ 中文\n\n"
  for text in [(STDLIB / "json" / "scanner.py").read_text(), unseen]:
    ids = tok.encode(text)
    assert max(ids) < 400 and tok.eod_id not in ids
    assert tok.decode(ids) == text
  assert len(tok.encode(unseen)) < len(unseen.encode())  # it does compress
  # A model's padded vocabulary rows beyond the pieces (a sampled id there) decode to nothing;
  # sentencepiece itself raised IndexError.
  ids = tok.encode("def f(): pass")
  assert tok.decode([*ids[:3], 400, 131071, *ids[3:]]) == "def f(): pass"


def test_sentencepiece_trained_from_the_train_split_is_cached(tmp_path):
  cfg = _config(tmp_path, tokenizer="sentencepiece", spm_vocab_size=500)
  pipe = input_pipeline.build(cfg)
  models = list((tmp_path / "tokenizers").glob("spm-500-*.model"))
  assert len(models) == 1 and pipe.tokenizer.vocab_size == 500
  text = (STDLIB / "json" / "encoder.py").read_text()
  assert pipe.tokenizer.decode(pipe.tokenizer.encode(text)) == text
  assert pipe.manifest["tokenizer"]["model_sha256"] == pipe.tokenizer.identity["model_sha256"]
  assert input_pipeline.build(cfg).fingerprint == pipe.fingerprint


def test_a_store_in_many_shards_reads_the_same_rows(tmp_path):
  """Shards are a layout, not data: the same fingerprint, the same batches as one shard."""
  whole = input_pipeline.build(_config(tmp_path / "one"))
  sharded = input_pipeline.build(_config(tmp_path / "many", store_shard_mb=0.01))
  assert sharded.fingerprint == whole.fingerprint
  shards = sharded.manifest["shards"]["train"]
  assert len(shards) > 5 and sum(shards) == whole.store.num_rows("train")
  files = sorted(p.name for p in sharded.store.path.glob("train_tokens.*.npy"))
  assert files == [store.shard_name("train", "tokens", i) for i in range(len(shards))]
  rows = np.random.default_rng(0).permutation(whole.store.num_rows("train"))[:300]
  for a, b in zip(whole.store.read_rows("train", rows), sharded.store.read_rows("train", rows),
                  strict=True):  # fmt: skip
    np.testing.assert_array_equal(a, b)
  first, second = (
    next(p.train_batches(global_batch_size=8, start_step=3, process_index=0, process_count=1))
    for p in (whole, sharded)
  )
  for key, value in first.items():
    np.testing.assert_array_equal(second[key], value)


def test_shares_tokenized_apart_pack_into_the_same_store(tmp_path, spm_model):
  """data.parallel_prepare's parts, here three shares written one after another: packed, they
  are the store one process prepares, array for array (SentencePiece ids, several shards)."""
  configs = {
    name: _config(tmp_path / name, tokenizer="sentencepiece", spm_model=str(spm_model))
    for name in ("alone", "shared")
  }
  for c in configs.values():
    c.data.store_shard_mb = 0.01
  alone = input_pipeline.build(configs["alone"])
  config = configs["shared"]
  resolved = pipeline.source_and_tokenizer(config)
  counts = [pipeline.tokenize_share(config, resolved, 0, 3)]
  with pytest.raises(input_pipeline.DataError, match=r"process 1's share of the train split"):
    pipeline.build_local(config, shares=3, resolved=resolved)  # a cache the others cannot see
  counts += [pipeline.tokenize_share(config, resolved, p, 3) for p in (1, 2)]
  assert sum(c["train"] for c in counts) == alone.manifest["splits"]["train"]["documents"]
  assert all(c["train"] > 0 for c in counts)
  shared = pipeline.build_local(config, shares=3, resolved=resolved)
  assert shared.fingerprint == alone.fingerprint
  assert shared.manifest["arrays"] == alone.manifest["arrays"]  # sizes and sha256 of every shard
  assert len(shared.manifest["shards"]["train"]) > 1
  assert os.listdir(tmp_path / "shared" / "stores") == [alone.fingerprint]  # shares removed
