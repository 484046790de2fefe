"""Sources: named TFDS datasets (mocked), local files, and clear errors for bad input."""

import json
import logging
import os
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

import input_pipeline
from configs.default import get_config
from input_pipeline import errors, sources, text_files

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _config(cache_dir, **data):
  c = get_config()
  c.data.cache_dir = str(cache_dir)
  c.data.seq_len = 32
  for key, value in data.items():
    setattr(c.data, key, value)
  return c


def _tfds_metadata(data_dir, name, splits):
  """Writes the split metadata a prepared dataset would have (mock_data reads it, no download)."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.info.set_splits(
    tfds.core.SplitDict(
      [tfds.core.SplitInfo(name=s, shard_lengths=[30], num_bytes=0) for s in splits]
    )
  )
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def _mock(data_dir):
  return tfds.testing.mock_data(
    num_examples=30, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(data_dir)
  )


def test_named_tfds_dataset_without_validation_falls_back_to_test(tmp_path, caplog):
  _tfds_metadata(tmp_path / "tfds", "lm1b", ["train", "test"])
  cfg = _config(tmp_path / "cache", source="tfds:lm1b", tfds_data_dir=str(tmp_path / "tfds"))
  with caplog.at_level(logging.WARNING), _mock(tmp_path / "tfds"):
    pipe = input_pipeline.build(cfg)
  assert "no 'validation' split; evaluating on its 'test' split" in caplog.text
  source = pipe.manifest["inputs"]["source"]
  assert source["kind"] == "tfds" and source["dataset"].startswith("lm1b/")
  assert source["splits"] == {"train": "train", "validation": "test"}
  assert pipe.manifest["splits"]["train"]["documents"] == 30
  batch = next(pipe.train_batches(global_batch_size=4, process_index=0, process_count=1))
  assert batch["inputs"].shape == (4, 32) and batch["weights"].sum() > 0
  assert len(pipe.eval_batches(global_batch_size=4, num_batches=1, process_count=1)) == 1


def test_named_tfds_dataset_with_validation_and_feature(tmp_path):
  _tfds_metadata(tmp_path / "tfds", "tiny_shakespeare", ["train", "validation", "test"])
  cfg = _config(
    tmp_path / "cache", source="tfds:tiny_shakespeare", tfds_data_dir=str(tmp_path / "tfds")
  )
  with _mock(tmp_path / "tfds"):
    pipe = input_pipeline.build(cfg)
  assert pipe.manifest["inputs"]["source"]["splits"]["validation"] == "validation"
  cfg.data.text_feature = "content"
  with _mock(tmp_path / "tfds"), pytest.raises(ValueError, match="'content' is not a feature"):
    input_pipeline.build(cfg)


def test_unknown_tfds_name_lists_close_matches(tmp_path):
  with pytest.raises(ValueError, match=r"unknown TFDS dataset .*close matches: .*lm1b") as info:
    input_pipeline.build(_config(tmp_path, source="tfds:lm1bb"))
  assert "tfds.list_builders()" in str(info.value)


def test_stdlib_source_lists_the_standard_library():
  files = sources._walk(STDLIB, suffix=".py")
  assert len(files) > 1000
  assert not any("site-packages" in f.parts for f in files)
  assert STDLIB / "json" / "decoder.py" in files


def test_split_is_by_file_name_hash_and_never_empty(tmp_path):
  files = [tmp_path / f"f{i}.txt" for i in range(200)]
  splits = text_files.assign_splits(tmp_path, files, 5)
  assert 0 < len(splits["validation"]) < 30
  assert sorted(splits["train"] + splits["validation"]) == sorted(files)
  again = text_files.assign_splits(tmp_path, list(reversed(files)), 5)
  assert set(again["validation"]) == set(splits["validation"])
  two = text_files.assign_splits(tmp_path, files[:2], 5)
  assert len(two["train"]) == len(two["validation"]) == 1


def test_directory_source_reads_every_file(tmp_path, monkeypatch):
  # Nothing left in the system's temporary directory (TFDS made one there for every new corpus).
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  corpus = tmp_path / "corpus"
  (corpus / "sub").mkdir(parents=True)
  (corpus / "a.txt").write_text("hello world\n" * 50)
  (corpus / "sub" / "b.md").write_text("# title\n" * 50)
  (corpus / "sub" / "c.bin").write_bytes(b"\xff\xfe" * 10)  # not UTF-8: skipped
  pipe = input_pipeline.build(_config(tmp_path / "cache", source=f"files:{corpus}"))
  assert pipe.manifest["inputs"]["source"]["num_files"] == 2
  m = pipe.manifest["splits"]
  assert m["train"]["documents"] + m["validation"]["documents"] == 2
  tokens = np.concatenate([pipe.store.read_rows(s, np.arange(m[s]["rows"]))[0].ravel() for s in m])
  assert (tokens == pipe.tokenizer.eod_id).sum() == 2
  assert [p.name for p in (tmp_path / "tmp").iterdir() if p.is_dir()] == []


@pytest.mark.parametrize(
  ("data", "error", "message"),
  [
    ({"source": "files:/no/such/dir"}, FileNotFoundError, "no such file or directory /no/such"),
    ({"source": "files:/no/such/*.txt"}, FileNotFoundError, "matched no files"),
    ({"source": "hf:wikitext"}, ValueError, "unknown data.source='hf:wikitext'; valid forms"),
    ({"source": "files:"}, ValueError, "names no path"),
    ({"tokenizer": "tiktoken"}, ValueError, "unknown data.tokenizer='tiktoken'; valid: byte"),
    ({"seq_len": 0}, ValueError, "data.seq_len must be >= 1, got 0"),
    ({"validation_percent": 100}, ValueError, r"validation_percent=100 must be in \[0, 100\)"),
    (
      {"tokenizer": "sentencepiece", "spm_model": "/no/such.model"},
      FileNotFoundError,
      "data.spm_model='/no/such.model': no such file",
    ),
  ],
)
def test_bad_input_is_a_clear_error(tmp_path, data, error, message):
  data = {"source": f"files:{STDLIB / 'json' / '*.py'}", **data}
  with pytest.raises(error, match=message):
    input_pipeline.build(_config(tmp_path, **data))


def test_a_tokenizer_file_of_another_kind_is_a_clear_error(tmp_path):
  from input_pipeline import tokenizers

  (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"')  # cut short
  with pytest.raises(errors.DataError, match=r"spm_model='.*tokenizer.json' is not a Sentence"):
    tokenizers.SentencePieceTokenizer(tmp_path / "tokenizer.json")
  with pytest.raises(errors.DataError, match=r"tokenizer.json cannot be read"):
    tokenizers.HFTokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text(
    json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "version": "1.0"})
  )
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
  with pytest.raises(errors.DataError, match=r"tokenizer_config.json is not JSON"):
    tokenizers.HFTokenizer(tmp_path)
  # GPT-2's directories name their end of text in config.json only (tokenizer_config.json
  # holds model_max_length): the import had been refused.
  (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 1024}')
  with pytest.raises(errors.DataError, match=r"names an eos_token, nor config.json an eos_tok"):
    tokenizers.HFTokenizer(tmp_path)
  (tmp_path / "config.json").write_text('{"eos_token_id": 0, "bos_token_id": 0}')
  tok = tokenizers.HFTokenizer(tmp_path)
  assert (tok.eod_id, tok.bos_id, tok.special_tokens["eos_token"]) == (0, None, "a")
  # An explicit null is read as transformers reads it: no such token.
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "a", "pad_token": null}')
  (tmp_path / "special_tokens_map.json").write_text('{"pad_token": "a"}')
  assert tokenizers.HFTokenizer(tmp_path).special_tokens == {"eos_token": "a"}


def test_empty_corpus_is_a_clear_error(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no files \\(empty corpus\\)"):
    input_pipeline.build(_config(tmp_path, source=f"files:{tmp_path / 'empty'}"))
  (tmp_path / "binary").mkdir()
  (tmp_path / "binary" / "x.bin").write_bytes(b"\xff\xfe\xfd")
  with pytest.raises(ValueError, match="no UTF-8 text .*empty corpus"):
    input_pipeline.build(_config(tmp_path, source=f"files:{tmp_path / 'binary'}"))


def _single_file(tmp_path, lines: int) -> Path:
  path = tmp_path / "input.txt"
  path.write_text("".join(f"line {i}: {'so it goes ' * (i % 7)}\n" for i in range(lines)))
  return path


def test_a_single_text_file_is_split_by_position(tmp_path, caplog):
  path = _single_file(tmp_path, 2000)
  with caplog.at_level(logging.INFO):
    pipeline = input_pipeline.build(
      _config(tmp_path / "cache", source=f"files:{path}", validation_percent=10)
    )
  assert "split by position" in caplog.text
  assert pipeline.store.num_rows("train") > 0 and pipeline.store.num_rows("validation") > 0
  tokens, segments = pipeline.store.read_rows("validation", np.arange(3))[:2]
  text = pipeline.tokenizer.decode(tokens[segments > 0].tolist())
  numbers = [int(part.split(":")[0]) for part in text.split("line ")[1:-1]]
  assert numbers and min(numbers) >= 1800  # the last 10% of the lines
  too_short = tmp_path / "short" / "input.txt"
  too_short.parent.mkdir()
  too_short.write_text("one line only\n")
  with pytest.raises(ValueError, match="has 1 lines: 10% of them for validation leaves validation"):
    input_pipeline.build(
      _config(tmp_path / "cache", source=f"files:{too_short}", validation_percent=10)
    )


def test_one_text_file_trains_and_evaluates(tmp_path, caplog):
  from cli_helpers import train_in_process

  path = _single_file(tmp_path, 3000)
  caplog.set_level(logging.INFO, logger="loom")
  report = train_in_process(tmp_path / "w", tmp_path / "cache", {"data.source": f"files:{path}"})
  assert "eval at step 20" in caplog.text and report["eval/loss"] > 0


def test_a_named_dataset_that_is_not_prepared_fails_in_one_line(tmp_path):
  from cli_helpers import run_train

  data_dir = tmp_path / "tfds"
  config = _config(tmp_path / "cache", source="tfds:lm1b", tfds_data_dir=str(data_dir))
  config.data.tfds_download = False
  with pytest.raises(ValueError, match=r"lm1b is not prepared in .*tfds build lm1b --data_dir"):
    input_pipeline.build(config)
  result = run_train(
    str(tmp_path / "w"),
    "--config.data.source=tfds:lm1b",
    f"--config.data.tfds_data_dir={data_dir}",
    "--config.data.tfds_download=False",
    cache_dir=str(tmp_path / "cache"),
  )
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "tfds build lm1b --data_dir DIR" in result.stderr


def _records(source) -> dict[str, list[str]]:
  return {split: list(source.documents(split)) for split in ("train", "validation")}


def test_json_lines_records_are_documents_and_bad_ones_are_reported(tmp_path, caplog):
  import json

  corpus = tmp_path / "corpus"
  corpus.mkdir()
  good = [{"text": f"document {i}: " + "words " * (i % 5 + 1), "id": i} for i in range(40)]
  lines = [json.dumps(r) for r in good]
  lines.insert(3, "{not json")  # line 4
  lines.insert(10, json.dumps({"body": "no text field"}))  # line 11
  lines.insert(20, json.dumps({"text": 7}))  # line 21
  lines.insert(25, json.dumps({"text": "   "}))  # line 26
  lines.insert(30, '{"text": "caf\xe9"}')  # line 31: one bad byte (Latin-1), not UTF-8
  text = "\n".join(lines) + "\n\n"
  (corpus / "a.jsonl").write_bytes(text.encode("utf-8").replace(b"caf\xc3\xa9", b"caf\xe9"))
  (corpus / "b.jsonl").write_text("\n".join(json.dumps(r) for r in good[:5]) + "\n")
  with caplog.at_level(logging.WARNING):
    source = sources.from_spec(f"files:{corpus}", _config(tmp_path).data, tmp_path / "cache")
  report = [r.getMessage() for r in caplog.records if "bad records" in r.getMessage()]
  assert len(report) == 1 and "a.jsonl: 5 bad records skipped" in report[0]
  assert "1 not valid JSON (lines 4)" in report[0] and "no 'text' field (lines 11)" in report[0]
  assert "(lines 21, 26)" in report[0] and "1 not UTF-8 (lines 31)" in report[0]
  # Each good record is one document (in whichever split its file's name falls).
  docs = _records(source)
  expected = [r["text"] for r in good] + [r["text"] for r in good[:5]]
  assert sorted(docs["train"] + docs["validation"]) == sorted(expected)


def test_a_corpus_of_symbolic_links_reads_as_its_links_names(tmp_path):
  """A Hugging Face hub snapshot links each file to a blob elsewhere: the files are named (and
  split, and fingerprinted) by their links, as a copy of the corpus would be."""
  blobs, linked, copied = tmp_path / "blobs", tmp_path / "linked", tmp_path / "copied"
  for d in (blobs, linked / "sub", copied / "sub"):
    d.mkdir(parents=True)
  for i, name in enumerate(["a.txt", "b.txt", "sub/c.txt"]):
    text = f"file {i}\n" * 40
    (blobs / f"{i:040x}").write_text(text)
    (linked / name).symlink_to(blobs / f"{i:040x}")
    (copied / name).write_text(text)
  data = _config(tmp_path, validation_percent=30).data
  source = sources.from_spec(f"files:{linked}", data, tmp_path / "cache")
  twin = sources.from_spec(f"files:{copied}", data, tmp_path / "cache")
  assert source.identity == twin.identity
  assert _records(source) == _records(twin)
  one = sources.from_spec(f"files:{linked / 'a.txt'}", data, tmp_path / "cache")
  docs = _records(one)  # one file: split by position
  assert "".join(docs["train"] + docs["validation"]) == "file 0\n" * 40


def test_parquet_rows_and_a_named_text_field(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq

  rows = [f"row {i} " + "text " * (i % 3 + 1) for i in range(50)]
  rows[7] = None  # a bad row: reported, not a document
  path = tmp_path / "docs.parquet"
  pq.write_table(pa.table({"content": rows, "n": list(range(50))}), path)
  data = _config(tmp_path, text_feature="content", validation_percent=10).data
  source = sources.from_spec(f"files:{path}", data, tmp_path / "cache")
  docs = _records(source)
  # One file: split by position over its 49 good rows, the last 10% (4) for validation.
  assert sorted(docs["validation"]) == sorted([r for r in rows if r][-4:])
  assert sorted(docs["train"]) == sorted([r for r in rows if r][:-4])
  missing = _config(tmp_path, validation_percent=10).data  # text_feature "text": no such column
  with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['content', 'n'\]\)"):
    sources.from_spec(f"files:{path}", missing, tmp_path / "cache2")


def test_a_single_json_lines_file_is_split_by_records(tmp_path, caplog):
  import json

  path = tmp_path / "chats.jsonl"
  path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(30)))
  with caplog.at_level(logging.INFO):
    source = sources.from_spec(
      f"files:{path}", _config(tmp_path, validation_percent=10).data, tmp_path / "cache"
    )
  assert "split by position, its last 10% of records" in caplog.text
  docs = _records(source)
  assert sorted(docs["validation"]) == ["record 27", "record 28", "record 29"]
  assert sorted(docs["train"]) == sorted(f"record {i}" for i in range(27))
