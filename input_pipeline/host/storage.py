"""Where a run's files live: local paths or object-store URIs (``gs://``, whatever epath serves).

Every file the project reads or writes goes through ``etils.epath`` (gcsfs for ``gs://``; why
not TensorFlow's client, and what each storage library needs to reach an emulator, is said in
``input_pipeline/host/settings.py``, which every entry point applies first).

Object stores have no rename: a single object write is atomic (readers see the old object or the
new one, never a part), so ``write_atomic`` writes in place there and renames on local disks.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import tempfile
import time

from etils import epath

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"  # the standard variable naming a GCS emulator


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` is an object-store URI (``scheme://...``) rather than a local path."""
  return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> epath.Path:
  """The absolute path: ``~`` expanded and made absolute locally; URIs unchanged."""
  text = os.fspath(path)
  if is_remote(text):
    return epath.Path(text.rstrip("/"))
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def cache_path(path: str | os.PathLike) -> str | os.PathLike:
  """A cache directory as given: a URI unchanged, a local path with ``~`` expanded."""
  text = os.fspath(path)
  return text.rstrip("/") if is_remote(text) else os.path.expanduser(text)


def write_atomic(path: epath.Path, data: str | bytes) -> None:
  """Writes the whole file so that a reader (or a crash) never sees a part of it."""
  path = epath.Path(path)
  if is_remote(path):
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return
  tmp = path.parent / f".{path.name}.tmp.{os.getpid()}"
  mode = "wb" if isinstance(data, bytes) else "w"
  with open(tmp, mode) as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_once(path: epath.Path, data: str) -> None:
  """Writes ``data`` (atomically) where ``path`` does not exist; leaves a file that holds it
  already as it is, and raises FileExistsError where the file holds anything else: a file a
  run was trained on is never replaced under it."""
  path = epath.Path(path)
  if path.exists():
    if path.read_text() != data:
      raise FileExistsError(f"{path} exists with other content")
    return
  write_atomic(path, data)


def move_tree(source: epath.Path, target: epath.Path, *, first: tuple[str, ...] = ()) -> None:
  """Moves the directory ``source`` to ``target`` (which must not exist), creating its parent.

  A rename on local disks. Object stores have neither directories nor rename (etils' rename
  refuses a target whose parent "folder" holds no object yet): every object is copied, then the
  source's objects are deleted, ``first`` (names in ``source``) before the rest, so that an
  interrupted move leaves the source without them (a checkpoint without its commit marker)."""
  source, target = epath.Path(source), epath.Path(target)
  if target.exists():
    raise FileExistsError(f"cannot move {source} to {target}: it exists")
  if not is_remote(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
    return
  # epath's own file system (and so its listings' cache, which must see the move).
  fs = epath.backend.fsspec_backend.fs(source)
  inner, inner_target = os.fspath(source), os.fspath(target)
  fs.copy(inner, inner_target, recursive=True)
  for name in first:
    if fs.exists(f"{inner}/{name}"):
      fs.rm(f"{inner}/{name}")
  fs.rm(inner, recursive=True)
  fs.invalidate_cache()


# The mark of a directory an output is written in before it is renamed into place (OUT.partial).
PARTIAL_MARK = ".loom-partial"


def check_partial(path: str) -> None:
  """Refuses ``path`` (an output's OUT.partial) where something other than an unfinished output
  of Loom's (which carries the mark) is there: that is the user's, and is never deleted."""
  if os.path.lexists(path) and not os.path.isfile(os.path.join(path, PARTIAL_MARK)):
    raise FileExistsError(
      f"{path} exists and is not an unfinished output of Loom's (no {PARTIAL_MARK} in it; one of "
      "an earlier Loom version has none either): move it away or choose another output name"
    )


def start_partial(path: str) -> None:
  """Makes ``path`` empty and marked: an earlier attempt's unfinished output is replaced."""
  check_partial(path)
  if os.path.lexists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  open(os.path.join(path, PARTIAL_MARK), "w").close()


def finish_partial(path: str, final: str) -> None:
  """Renames the finished output ``path`` into place at ``final``, then drops its mark."""
  os.replace(path, final)
  os.remove(os.path.join(final, PARTIAL_MARK))


def local_scratch(path: str | os.PathLike) -> epath.Path:
  """This host's local working space for ``path`` (an object-store cache): where files that
  must be local (memory-mapped stores, TFDS's TFRecords, built before upload) are kept."""
  key = hashlib.sha256(os.fspath(path).rstrip("/").encode()).hexdigest()[:16]
  root = os.environ.get("LOOM_LOCAL_SCRATCH") or os.path.expanduser("~/.cache/loom/scratch")
  return epath.Path(root) / key


def append_lines(path, lines: list[str]) -> None:
  """Adds lines to a JSON-lines file another writer may hold open (a training run's metrics):
  appended in place on local disks; on object stores, read and rewritten whole (atomically)."""
  path = epath.Path(path)
  text = "".join(line + "\n" for line in lines)
  if not is_remote(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = path.read_text() if path.exists() else ""
  write_atomic(path, old + ("" if not old or old.endswith("\n") else "\n") + text)


class AppendOnlyLog:
  """A JSON-lines file that grows: appended to on local disks; on object stores (which cannot
  append) the whole object is rewritten from memory at most every ``upload_every`` seconds and at
  every ``flush(force=True)`` (the loop forces one before each checkpoint save, so no line of a
  checkpointed step is ever lost). Lines another writer added to the object since the last upload
  (``append_lines``: ``train.evaluate`` beside a live run) are read back and kept, in place."""

  def __init__(self, path: epath.Path, lines: list[str], *, upload_every: float = 30.0):
    self.path = epath.Path(path)
    self.remote = is_remote(self.path)
    self._lines = list(lines)
    self._upload_every = upload_every
    self._uploaded_at = 0.0
    self._dirty = False
    self._uploaded = "".join(line + "\n" for line in self._lines)
    write_atomic(self.path, self._uploaded)
    self._file = None
    if not self.remote:
      self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

  def append(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line + "\n")
      self._file.flush()
      return
    self._lines.append(line)
    self._dirty = True
    self.flush(force=False)

  def flush(self, *, force: bool = True) -> None:
    if self._file is not None or not self._dirty:
      return
    if force or time.monotonic() - self._uploaded_at >= self._upload_every:
      self._adopt_others_lines()
      text = "".join(line + "\n" for line in self._lines)
      write_atomic(self.path, text)
      self._uploaded, self._uploaded_at = text, time.monotonic()
      self._dirty = False

  def _adopt_others_lines(self) -> None:
    try:  # the object's size first (one metadata request): read it only when it grew
      if not self.path.exists() or self.path.stat().length == len(self._uploaded.encode()):
        return
      current = self.path.read_text()
    except OSError:
      return  # the upload below says what is wrong with the store
    if current == self._uploaded or not current.startswith(self._uploaded):
      return
    # Theirs came after what this log had uploaded and before what it holds since.
    theirs = [line for line in current[len(self._uploaded) :].splitlines() if line.strip()]
    at = self._uploaded.count("\n")
    self._lines[at:at] = theirs

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self.flush(force=True)


class LocalMirror:
  """A local scratch directory whose files are copied to ``remote`` on ``sync()``: for writers
  that only speak to local disks (TensorFlow's summary writer when the work directory is remote).
  Files are copied whole (event files only grow, so the copy is always a consistent prefix)."""

  def __init__(self, remote: epath.Path, prefix: str):
    self.remote = epath.Path(remote)
    self.local = pathlib.Path(tempfile.mkdtemp(prefix=prefix))

  def sync(self) -> None:
    self.remote.mkdir(parents=True, exist_ok=True)
    for file in sorted(self.local.rglob("*")):
      if file.is_file():
        target = self.remote / file.relative_to(self.local).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
