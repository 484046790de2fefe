"""Text sources, all read through TensorFlow Datasets: the stdlib corpus, local files, TFDS names.

  "stdlib"                   the Python standard library's own *.py source (site-packages excluded):
                             on every machine, no download
  "files:<dir or glob>"      the user's text files (a directory means every file under it)
  "tfds:<name>[:<version>]"  a TFDS dataset, text in data.text_feature, data dir data.tfds_data_dir

Local files become a `LoomTextFiles` TFDS dataset prepared under data.cache_dir/tfds, so every
source is then read by the same code: `Source.documents(split)` for split "train" or "validation".
"""

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import glob
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from input_pipeline import errors, tensorflow_import, text_files
from input_pipeline.host import storage

tensorflow_import.load()  # before TFDS imports TensorFlow itself: without Keras

_log = logging.getLogger(__name__)

SCHEMES = ("stdlib", "files:<dir or glob>", "tfds:<name>[:<version>]")
SPLITS = ("train", "validation")
_GLOB_CHARS = set("*?[")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class Source:
  """A prepared TFDS dataset and how Loom reads it."""

  spec: str  # data.source as given
  identity: dict  # what the data fingerprint hashes: kind, name or file digest, splits, feature
  prepared: Callable[[], tfds.core.DatasetBuilder]
  text_feature: str
  splits: dict  # Loom split ("train" / "validation") -> the dataset's split name

  @property
  def builder(self) -> tfds.core.DatasetBuilder:
    """The prepared dataset: prepared when its documents are first needed (once), so that a
    run whose packed store already exists never prepares, locks or downloads it."""
    return self.prepared()

  def documents(self, split: str, share: tuple[int, int] = (0, 1)) -> Iterator[str]:
    """The split's documents as str, in the dataset's stored (deterministic) order.

    ``share=(p, n)``: only the p-th of n contiguous ranges of that order (a TFDS split slice);
    the n shares read one after another are the whole split, in the same order.
    """
    name = self.splits[split]
    if name not in self.builder.info.splits:
      return
    p, n = share
    if n > 1:
      total = self.builder.info.splits[name].num_examples
      start, stop = total * p // n, total * (p + 1) // n
      if start == stop:
        return
      name = f"{name}[{start}:{stop}]"
    ds = self.builder.as_dataset(split=name, shuffle_files=False)
    feature = self.text_feature
    ds = ds.map(tensorflow_import.as_written(lambda ex: ex[feature])).batch(64).prefetch(2)
    for texts in ds.as_numpy_iterator():
      for raw in texts:
        yield raw.decode("utf-8", errors="replace")

  def num_documents(self, split: str) -> int:
    name = self.splits[split]
    return self.builder.info.splits[name].num_examples if name in self.builder.info.splits else 0


def from_spec(spec: str, data_config, cache_dir: Path) -> Source:
  """The Source for data.source; prepares local files as a TFDS dataset (once) on the way."""
  if spec == "stdlib":
    root = Path(sysconfig.get_paths()["stdlib"])
    return _local_source(spec, root, _walk(root, suffix=".py"), data_config, cache_dir)
  if spec.startswith("files:"):
    root, files = _expand_files(spec)
    return _local_source(spec, root, files, data_config, cache_dir)
  if spec.startswith("tfds:"):
    return _tfds_source(spec, data_config)
  raise errors.DataError(f"unknown data.source={spec!r}; valid forms: {', '.join(SCHEMES)}")


def _walk(root: Path, suffix: str = "") -> list[Path]:
  """Regular files under root (hidden and package-install directories pruned), sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    found += [Path(dirpath, f) for f in filenames if f.endswith(suffix) and not f.startswith(".")]
  return sorted(found)


def _absolute(path: Path) -> Path:
  """Absolute and normalised, symbolic links kept: a corpus of links (a Hugging Face hub
  snapshot, git-annex, DVC) stays under its root, its files named by their links' names."""
  return Path(os.path.abspath(path))


def _expand_files(spec: str) -> tuple[Path, list[Path]]:
  pattern = os.path.expanduser(spec[len("files:") :])
  if not pattern:
    raise errors.DataError("data.source='files:' names no path; use files:<dir> or files:<glob>")
  if _GLOB_CHARS & set(pattern):
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
      raise errors.DataNotFoundError(f"data.source={spec!r}: the glob {pattern!r} matched no files")
    return _absolute(root), [_absolute(f) for f in files]
  path = Path(pattern)
  if not path.exists():
    raise errors.DataNotFoundError(f"data.source={spec!r}: no such file or directory {path}")
  if path.is_file():
    return _absolute(path.parent), [_absolute(path)]
  files = _walk(path)
  if not files:
    raise errors.DataError(
      f"data.source={spec!r}: the directory {path} holds no files (empty corpus)"
    )
  return _absolute(path), [_absolute(f) for f in files]


@contextlib.contextmanager
def _file_lock(path: Path):
  """An exclusive lock between processes on this machine (TFDS's own prepare is not)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _local_source(spec: str, root: Path, files: list[Path], data_config, cache_dir: Path) -> Source:
  if not files:
    raise errors.DataError(f"data.source={spec!r}: no files found under {root} (empty corpus)")
  percent = int(data_config.validation_percent)
  if not 0 <= percent < 100:
    raise errors.DataError(f"data.validation_percent={percent} must be in [0, 100)")
  feature = str(data_config.text_feature)
  text, digest = text_files.scan(root, files, percent, feature)
  if not text:
    raise errors.DataError(
      f"data.source={spec!r}: no UTF-8 text in the {len(files)} files (empty corpus)"
    )
  config = text_files.make_config(root, text, percent, digest, feature)
  # TFDS writes TFRecords through TensorFlow's own file system, which cannot reach every object
  # store (input_pipeline/host/storage.py): with a remote cache the dataset is a local
  # intermediate; only the packed store, which every host reads, goes to the shared cache.
  base = storage.local_scratch(cache_dir) if storage.is_remote(cache_dir) else Path(cache_dir)
  data_dir = Path(base) / "tfds"

  def prepare() -> tfds.core.DatasetBuilder:
    with _file_lock(data_dir / f"{config.name}.lock"):
      # Made after the lock: another process may have prepared it while we waited.
      ready = text_files.LoomTextFiles(config=config, data_dir=str(data_dir))
      if not ready.is_prepared():
        _log.info("Preparing %d local text files as TFDS dataset %s", len(files), ready.data_dir)
        ready.download_and_prepare()
    return ready

  identity = {
    "kind": "local_files",
    "dataset": f"{text_files.LoomTextFiles.name}/{config.name}:{text_files.DATASET_VERSION}",
    "files_sha256": digest,
    "num_files": len(text),
    "validation_percent": percent,
  }
  splits = {"train": "train", "validation": "validation"}
  return Source(spec, identity, functools.cache(prepare), "text", splits)


def _prepare_named(builder, spec: str, name: str, data_dir: str | None, download: bool) -> None:
  """A named dataset, prepared in data.tfds_data_dir (downloaded first if allowed and needed)."""
  if builder.is_prepared():
    return
  where = data_dir or "TFDS's default data dir"
  remedy = (
    f"where there is network, run `tfds build {name.split(':')[0]} --data_dir DIR` and set "
    "data.tfds_data_dir=DIR"
  )
  if not download:
    raise errors.DataError(
      f"data.source={spec!r}: {name} is not prepared in {where} and data.tfds_download=False; "
      + remedy
    )
  try:
    builder.download_and_prepare()
  except Exception as e:  # noqa: BLE001 - no network, a moved URL, a missing extra: all mean this
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise errors.DataError(
      f"data.source={spec!r}: {name} is not prepared in {where} and could not be downloaded "
      f"({type(e).__name__}: {first}); {remedy}"
    ) from e


def _tfds_source(spec: str, data_config) -> Source:
  name = spec[len("tfds:") :]
  if not name:
    raise errors.DataError("data.source='tfds:' names no dataset; use tfds:<name>[:<version>]")
  data_dir = data_config.tfds_data_dir or None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    # Registered builders only: the community index lives on gs://, a network round trip (gcsfs
    # retries for two minutes where there is no network).
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(name.split(":")[0], known, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else "no close matches"
    raise errors.DataError(
      f"unknown TFDS dataset in data.source={spec!r} ({hint}); see "
      "`python -c 'import tensorflow_datasets as tfds; print(tfds.list_builders())'`"
    ) from e
  _prepare_named(builder, spec, name, data_dir, bool(data_config.tfds_download))
  available = list(builder.info.splits.keys())
  if "train" not in available:
    raise errors.DataError(f"data.source={spec!r} has no 'train' split; it has {available}")
  if "validation" in available:
    val = "validation"
  elif "test" in available:
    val = "test"
    _log.warning("%s has no 'validation' split; evaluating on its 'test' split", spec)
  else:
    raise errors.DataError(
      f"data.source={spec!r} has neither 'validation' nor 'test'; it has {available}"
    )
  feature = data_config.text_feature
  features = list(builder.info.features.keys())
  if feature not in features:
    raise errors.DataError(
      f"data.text_feature={feature!r} is not a feature of {spec!r}; it has {features}"
    )
  identity = {
    "kind": "tfds",
    "dataset": builder.info.full_name,
    "text_feature": feature,
    "splits": {"train": "train", "validation": val},
  }
  return Source(spec, identity, lambda: builder, feature, {"train": "train", "validation": val})
