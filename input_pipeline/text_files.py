"""A TFDS dataset of local text files: one example (feature "text") per file, no download.

The file list is the builder config: its name is a hash of the files' relative paths and contents
and of the validation share, so different corpora (or a changed file) never collide in a data dir.
Files go to "validation" when a hash of their relative path falls under validation_percent, so the
split is stable when files are added or removed and does not depend on where the corpus lives.
"""

import dataclasses
import hashlib
import logging
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath

from input_pipeline import errors

DATASET_VERSION = "1.0.0"

_log = logging.getLogger(__name__)


def scan(root: Path, files: list[Path], validation_percent: int) -> tuple[list[Path], str]:
  """Keeps the UTF-8 files (others are logged and skipped) and hashes them, in one read.

  The digest is sha256 over (relative path, content sha256) of every kept file, in order, and the
  validation share.
  """
  h = hashlib.sha256(f"validation_percent={validation_percent}\n".encode())
  kept = []
  for path in files:
    data = path.read_bytes()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:
      _log.warning("Skipping %s: not UTF-8 text", path)
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


def split_by_position(path: Path, validation_percent: int) -> tuple[str, str]:
  """(train, validation) text of one file: the last validation_percent of its lines held out."""
  lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
  held = len(lines) * validation_percent // 100
  if held == 0 or held == len(lines):
    raise errors.DataError(
      f"{path} has {len(lines)} lines: {validation_percent}% of them for validation leaves "
      f"{'validation' if held == 0 else 'train'} empty; use a longer file, another "
      "data.validation_percent, or several files"
    )
  return "".join(lines[: len(lines) - held]), "".join(lines[len(lines) - held :])


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  """The corpus: a root directory, the files under it and the validation share."""

  root: str = ""
  # Out of the repr: TFDS logs the whole config, and 1,800 paths would flood the log.
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
  validation_percent: int = 5
  by_position: bool = False  # one file: its last validation_percent of lines is validation


def make_config(
  root: Path, files: list[Path], validation_percent: int, digest: str
) -> TextFilesConfig:
  """The builder config for UTF-8 `files` whose `scan` digest is `digest`.

  A single file (nanoGPT's input.txt) cannot be split by file name: it is split by position,
  its last validation_percent of lines going to validation.
  """
  by_position = len(files) == 1 and validation_percent > 0
  if by_position:
    split_by_position(files[0], validation_percent)  # refuses a file too short to split, now
    _log.info(
      "%s is a single file: split by position, its last %d%% of lines for validation",
      files[0],
      validation_percent,
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
  )


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
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files are local: nothing to download
    cfg = self.builder_config
    root = Path(cfg.root)
    if cfg.by_position:
      train, validation = split_by_position(Path(cfg.files[0]), cfg.validation_percent)
      name = Path(cfg.files[0]).name
      return {
        "train": iter([(f"{name}#train", {"text": train})]),
        "validation": iter([(f"{name}#validation", {"text": validation})]),
      }
    splits = assign_splits(root, [Path(p) for p in cfg.files], cfg.validation_percent)
    # TFDS cannot write an empty split; a one-file corpus simply has no validation split.
    return {name: self._generate_examples(root, fs) for name, fs in splits.items() if fs}

  def _generate_examples(self, root: Path, files: list[Path]):
    for path in files:
      # `scan` kept only UTF-8 files; "replace" covers one edited since.
      text = path.read_bytes().decode("utf-8", errors="replace")
      yield path.relative_to(root).as_posix(), {"text": text}
