"""A TFDS dataset of local text files: one example (feature "text") per document, no download.

A document is a whole plain-text file, a record of a JSON-lines file (``*.jsonl``: an object per
line whose ``data.text_feature`` field, "text" by default, holds the text) or a row of a Parquet
file (``*.parquet``: that column). Records that are not valid JSON, lack the field, or hold no
text are bad: counted and reported with their first line (row) numbers at every start, never
silently dropped.

The file list is the builder config: its name is a hash of the files' relative paths and contents
and of the validation share, so different corpora (or a changed file) never collide in a data dir.
Files go to "validation" when a hash of their relative path falls under validation_percent, so the
split is stable when files are added or removed and does not depend on where the corpus lives.
"""

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import errors, tensorflow_import

tensorflow_import.load()  # before TFDS imports TensorFlow itself: without Keras

DATASET_VERSION = "1.0.0"

_log = logging.getLogger(__name__)


RECORD_SUFFIXES = (".jsonl", ".parquet")  # files of many documents
_REPORTED_BAD = 5  # bad record numbers named per file


def is_records(path: Path) -> bool:
  return path.suffix in RECORD_SUFFIXES


def documents(path: Path, text_feature: str = "text") -> tuple[list[str], dict[str, list[int]]]:
  """The documents of one file, and its bad records: {reason: [1-based line / row numbers]}."""
  if not is_records(path):
    return [path.read_bytes().decode("utf-8", errors="replace")], {}
  texts, bad = [], {}
  if path.suffix == ".jsonl":
    with open(path, "rb") as f:
      values = []
      for number, raw in enumerate(f, 1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError:
          bad.setdefault("not UTF-8", []).append(number)
          continue
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          bad.setdefault("not valid JSON", []).append(number)
          continue
        if not isinstance(record, dict) or text_feature not in record:
          bad.setdefault(f"no {text_feature!r} field", []).append(number)
          continue
        values.append((number, record[text_feature]))
  else:
    try:
      import pyarrow.parquet as pq  # noqa: PLC0415 (only for Parquet corpora)
    except ImportError as e:
      raise errors.DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from e
    table = pq.read_table(path)
    if text_feature not in table.column_names:
      raise errors.DataError(
        f"{path}: no column {text_feature!r} (columns: {table.column_names}); set "
        f"data.text_feature to the one holding the text"
      )
    values = list(enumerate(table.column(text_feature).to_pylist(), 1))
  for number, value in values:
    if not isinstance(value, str) or not value.strip():
      bad.setdefault(f"{text_feature!r} is not text or is empty", []).append(number)
    else:
      texts.append(value)
  return texts, bad


def report_bad(path: Path, bad: dict[str, list[int]]) -> int:
  """Logs a file's bad records (how many, why, the first line numbers); returns the count."""
  count = sum(len(numbers) for numbers in bad.values())
  if count:
    unit = "rows" if path.suffix == ".parquet" else "lines"
    reasons = "; ".join(
      f"{len(n)} {why} ({unit} {', '.join(map(str, n[:_REPORTED_BAD]))}"
      + (", ...)" if len(n) > _REPORTED_BAD else ")")
      for why, n in bad.items()
    )
    _log.warning("%s: %d bad records skipped: %s", path, count, reasons)
  return count


def scan(
  root: Path, files: list[Path], validation_percent: int, text_feature: str = "text"
) -> tuple[list[Path], str]:
  """Keeps the UTF-8 files (others are logged and skipped) and hashes them, in one read; reports
  the bad records of JSON-lines and Parquet files.

  The digest is sha256 over (relative path, content sha256) of every kept file, in order, and the
  validation share (and the text field, when any file holds records).
  """
  h = hashlib.sha256(f"validation_percent={validation_percent}\n".encode())
  if any(is_records(p) for p in files):
    h.update(f"text_feature={text_feature}\n".encode())
  kept = []
  for path in files:
    data = path.read_bytes()
    if not is_records(path):  # a record file's lines that are not UTF-8 are its bad records
      try:
        data.decode("utf-8")
      except UnicodeDecodeError:
        _log.warning("Skipping %s: not UTF-8 text", path)
        continue
    if is_records(path):
      texts, bad = documents(path, text_feature)
      report_bad(path, bad)
      if not texts:
        _log.warning("Skipping %s: no good records", path)
        continue
    kept.append(path)
    h.update(path.relative_to(root).as_posix().encode() + b"\0")
    h.update(hashlib.sha256(data).digest())
  return kept, h.hexdigest()


def is_validation(relative_path: str, validation_percent: int) -> bool:
  bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 100
  return bucket < validation_percent


def assign_splits(root: Path, files: list[Path], validation_percent: int) -> dict[str, list[Path]]:
  """{"train": [...], "validation": [...]} by file-name hash.

  Small corpora can leave a split empty by chance; then the file whose hash is lowest (for
  validation) or highest (for train) moves over, so both splits exist whenever there are 2 files.
  """
  rel = {p: p.relative_to(root).as_posix() for p in files}
  val = [p for p in files if is_validation(rel[p], validation_percent)]
  train = [p for p in files if not is_validation(rel[p], validation_percent)]
  order = sorted(files, key=lambda p: hashlib.sha256(rel[p].encode()).hexdigest())
  if validation_percent > 0 and not val and len(train) > 1:
    val, train = [order[0]], [p for p in files if p != order[0]]
  if not train and len(val) > 1:
    train, val = [order[-1]], [p for p in files if p != order[-1]]
  return {"train": train, "validation": val}


def split_by_position(
  path: Path, validation_percent: int, text_feature: str = "text"
) -> tuple[list[str], list[str]]:
  """(train, validation) documents of one file: the last validation_percent of its records (a
  JSON-lines or Parquet file) or of its lines (plain text, then one document each) held out."""
  if is_records(path):
    units, what = documents(path, text_feature)[0], "records"
  else:
    units, what = path.read_bytes().decode("utf-8", errors="replace").splitlines(True), "lines"
  held = len(units) * validation_percent // 100
  if held == 0 or held == len(units):
    raise errors.DataError(
      f"{path} has {len(units)} {what}: {validation_percent}% of them for validation leaves "
      f"{'validation' if held == 0 else 'train'} empty; use a longer file, another "
      "data.validation_percent, or several files"
    )
  train, validation = units[: len(units) - held], units[len(units) - held :]
  if what == "lines":
    return ["".join(train)], ["".join(validation)]
  return train, validation


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """The corpus: a root directory, the files under it and the validation share."""

  root: str = ""
  # Out of the repr: TFDS logs the whole config, and 1,800 paths would flood the log.
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  validation_percent: int = 5
  by_position: bool = False  # one file: its last validation_percent of lines is validation
  text_feature: str = "text"  # the text field of JSON-lines records and Parquet rows


def make_config(
  root: Path, files: list[Path], validation_percent: int, digest: str, text_feature: str = "text"
) -> TextFilesConfig:
  """The builder config for UTF-8 `files` whose `scan` digest is `digest`.

  A single file (nanoGPT's input.txt) cannot be split by file name: it is split by position,
  its last validation_percent of lines going to validation.
  """
  by_position = len(files) == 1 and validation_percent > 0
  if by_position:
    split_by_position(files[0], validation_percent, text_feature)  # refuses one too short, now
    _log.info(
      "%s is a single file: split by position, its last %d%% of %s for validation",
      files[0],
      validation_percent,
      "records" if is_records(files[0]) else "lines",
    )
  return TextFilesConfig(
    name=f"files_{digest[:20]}" + ("_by_position" if by_position else ""),
    version=DATASET_VERSION,
    release_notes=LoomTextFiles.RELEASE_NOTES,
    description=f"{len(files)} text files under {root}",
    root=str(root),
    files=tuple(str(p) for p in files),
    validation_percent=validation_percent,
    by_position=by_position,
    text_feature=text_feature,
  )


class _LocalInfo(tfds.core.DatasetInfo):
  """A local corpus's metadata, never looked for on TFDS's bucket (gs://tfds-data).

  TFDS 4.9.10 calls `initialize_from_bucket` for every builder whose data is not prepared yet, and
  it makes a temporary directory before it finds that there is nothing to fetch: every first run
  on a corpus left an empty `tmp...tfds` directory in the system's temporary directory.
  """

  def initialize_from_bucket(self) -> None:
    pass


class LoomTextFiles(tfds.core.GeneratorBasedBuilder):
  """Local text files as a TFDS dataset; construct with config=make_config(...)."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "One example per UTF-8 text file; split by file-name hash."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 finds a package builder's file through the optional `importlib_resources` (an
    # undeclared dependency) and fails without it; this file is the answer it is looking for.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # What `dataset_info_from_configs` builds (this package ships no metadata files), as _LocalInfo.
    metadata = self.get_metadata()
    return _LocalInfo(
      builder=self,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      supervised_keys=None,
      description=metadata.description or None,
      citation=metadata.citation or None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files are local: nothing to download
    cfg = self.builder_config
    root = Path(cfg.root)
    if cfg.by_position:
      parts = split_by_position(Path(cfg.files[0]), cfg.validation_percent, cfg.text_feature)
      name = Path(cfg.files[0]).name
      return {
        split: iter([(f"{name}#{split}#{i}", {"text": text}) for i, text in enumerate(texts)])
        for split, texts in zip(("train", "validation"), parts, strict=True)
      }
    splits = assign_splits(root, [Path(p) for p in cfg.files], cfg.validation_percent)
    # TFDS cannot write an empty split; a one-file corpus simply has no validation split.
    return {name: self._generate_examples(root, fs) for name, fs in splits.items() if fs}

  def _generate_examples(self, root: Path, files: list[Path]):
    for path in files:
      # `scan` kept only UTF-8 files; "replace" covers one edited since.
      texts, _ = documents(path, self.builder_config.text_feature)
      name = path.relative_to(root).as_posix()
      for i, text in enumerate(texts):
        yield (f"{name}#{i}" if is_records(path) else name), {"text": text}
