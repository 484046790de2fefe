"""Commands the tests start, as forks of a process that has imported Loom's libraries once.

Each ``python -m train`` the suite starts spent about 3 CPU-s importing TensorFlow, JAX, Flax and
Orbax before its first line of Loom ran (a warm tiny run: 6.3 s wall, 6.8 CPU-s; forked from a
process that had imported them: 2.7 s, 3.1 CPU-s, the same losses). ``spawn`` and ``run`` start a
command as ``subprocess.Popen`` and ``subprocess.run`` would, but as a fork of this module's
server: one per pytest worker, started on first use, which imported the trainer's modules with
the session's environment (conftest.py) and never started a JAX backend or parsed a flag. The
child then takes the command's environment, working directory, standard streams and session,
and runs the module as ``python -m`` runs it (``runpy``, as ``__main__``), exiting through
Python's own shutdown.

It is a real process of its own: tests signal it, kill its process group and read its exit
code as before (the server waits for it and reports its status). Only what the command's
interpreter would have read from its environment before Loom's code ran is shared, so a command
whose environment differs from the server's in a variable those imports read
(``_READ_BY_IMPORTS``) starts as a fresh interpreter instead, as does every command when
``LOOM_TESTS_FORK_SERVER=0`` (``LOOM_TESTS_FORK_SERVER_LOG=FILE`` lists which were forked). The
commands that test a fresh start itself (imports, the README's commands, the notebooks, the
other entry points' own tests) start fresh interpreters.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# The environment variables that the server's imports (TensorFlow, JAX, Flax, Orbax, TensorStore,
# NumPy and the interpreter itself) read as they load: a command whose environment has any of them
# otherwise than the server's after its imports starts as a fresh interpreter. The rest are read
# at run time, in the child: XLA_FLAGS and XLA_PYTHON_CLIENT_* when the backend starts, Loom's
# own when its code asks (train/, input_pipeline/), a test's own (WANDB_MODE, ...) by libraries
# the server never imported.
_READ_BY_IMPORTS = (
  "JAX_", "TF_", "TF2_", "PYTHON", "LD_", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "NPY_", "ABSL",
  "EPATH_", "FLAX_", "TENSORSTORE_", "GRPC_", "CUDA_", "TPU_", "LIBTPU", "MALLOC_", "ML_DTYPES",
)  # fmt: skip
# Of those, translated from STORAGE_EMULATOR_HOST at run time (input_pipeline/host/settings.py).
_RUNTIME = {"TENSORSTORE_GCS_HTTP_URL"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULES = ("train.trainer", "train.inference.generation", "input_pipeline.host.command")


# ---------------------------------------------------------------------------------------------
# The server (``python tests/fork_server.py SOCKET``).


def _serve(path: str) -> None:
  import importlib

  # This checkout's code, as `python -m` from the repository finds it (sys.path[0] is the working
  # directory), not whichever checkout an installed copy of Loom points at.
  sys.path[0] = REPO
  for name in _MODULES:
    importlib.import_module(name)
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(64)
  # The client holds our stdin: its end (the pytest worker gone) ends the server.
  threading.Thread(target=_exit_with_stdin, daemon=True).start()
  print("ready", json.dumps(dict(os.environ)), flush=True)  # as the imports left it
  while True:
    connection, _ = listener.accept()
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    while not message.endswith(b"\n"):  # the rest of a long request
      message += connection.recv(1 << 20)
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
      listener.close()
      _child(request, fds, connection)  # never returns: exits through SystemExit
    for fd in fds:
      os.close(fd)
    connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    threading.Thread(target=_report, args=(pid, connection), daemon=True).start()


def _exit_with_stdin() -> None:
  # Raw reads: a thread blocked in sys.stdin's buffered reader would hold its lock in every fork.
  while os.read(0, 4096):
    pass
  os._exit(0)


def _report(pid: int, connection: socket.socket) -> None:
  _, status = os.waitpid(pid, 0)
  try:
    connection.sendall(json.dumps({"status": status}).encode() + b"\n")
  finally:
    connection.close()


def _child(request: dict, fds: list[int], connection: socket.socket) -> None:
  connection.close()
  if request["new_session"]:
    os.setsid()
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
  for fd in set(fds):
    if fd > 2:
      os.close(fd)
  # sys.stdout and sys.stderr write to descriptors 1 and 2, now the command's; buffered as a
  # fresh interpreter's are for a file or pipe (the server's were one too, and are empty).
  os.chdir(request["cwd"])
  os.environ.clear()
  os.environ.update(request["env"])
  # Read again from the command's TMPDIR (TEMP, TMP) when asked, as a fresh interpreter reads it.
  tempfile.tempdir = None
  site = sys.modules.get("sitecustomize")
  if getattr(site, "LOOM_TESTS_SITE", False):
    site._add_session_flags()
  module, args = request["module"], request["args"]
  sys.path[0] = os.getcwd()  # as `python -m` has it
  sys.argv = [module, *args]
  import runpy

  runpy.run_module(module, run_name="__main__", alter_sys=True)
  sys.exit(0)


# ---------------------------------------------------------------------------------------------
# The client.


class _Server:
  def __init__(self) -> None:
    self.directory = tempfile.mkdtemp(prefix="loom-fork-server-")
    self.path = os.path.join(self.directory, "socket")
    self.pre = dict(os.environ if _base_env is None else _base_env)
    self.process = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), self.path],
      env=self.pre,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      cwd=REPO,
    )
    word, _, environment = self.process.stdout.readline().partition(b" ")
    if word != b"ready":
      raise RuntimeError(f"the fork server did not start (exit {self.process.wait()})")
    self.env = json.loads(environment)  # after the server's imports, which set a few
    atexit.register(self.close)

  def differences(self, env: dict) -> set[str]:
    """The variables an import could have read that ``env`` has otherwise than the server. One
    the server's own imports set (absent from ``env``, where the same imports will set it) is
    not a difference."""
    keys = {k for k in set(env) | set(self.env) if k.startswith(_READ_BY_IMPORTS)} - _RUNTIME
    set_by_imports = {k for k in self.env if k not in self.pre and k not in env}
    return {k for k in keys - set_by_imports if env.get(k) != self.env.get(k)}

  def serves(self, env: dict) -> bool:
    return self.process.poll() is None and not self.differences(env)

  def close(self) -> None:
    if self.process.poll() is None:
      self.process.stdin.close()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
    shutil.rmtree(self.directory, ignore_errors=True)


_server: _Server | None = None
_server_lock = threading.Lock()
# The environment the server imports with: the session's, as conftest.py left it (set_base_env),
# not whatever a test had patched when it first started a command.
_base_env: dict | None = None


def set_base_env(env: dict) -> None:
  global _base_env
  _base_env = dict(env)


def _the_server() -> _Server | None:
  global _server
  if os.environ.get("LOOM_TESTS_FORK_SERVER", "1") == "0":
    return None
  with _server_lock:
    if _server is None:
      _server = _Server()
    return _server


class Forked:
  """The part of ``subprocess.Popen``'s interface the tests use, for a forked command."""

  def __init__(self, connection: socket.socket, pid: int, stdout, stderr, args, buffer=b"") -> None:
    self.args, self.pid, self.returncode = args, pid, None
    self.stdout, self.stderr = stdout, stderr
    self._connection = connection
    self._buffer = buffer  # what the server sent after the pid: the status, if already known

  def _read_status(self, timeout: float | None) -> bool:
    while b"\n" not in self._buffer:
      ready, _, _ = select.select([self._connection], [], [], timeout)
      if not ready:
        return False
      chunk = self._connection.recv(4096)
      if not chunk:  # the server ended without a word: count the command as killed
        self._buffer += json.dumps({"status": signal.SIGKILL}).encode() + b"\n"
        break
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    self.returncode = os.waitstatus_to_exitcode(json.loads(line)["status"])
    self._connection.close()
    return True

  def poll(self) -> int | None:
    if self.returncode is None:
      self._read_status(0)
    return self.returncode

  def wait(self, timeout: float | None = None) -> int:
    if self.returncode is None and not self._read_status(timeout):
      raise subprocess.TimeoutExpired(self.args, timeout)
    return self.returncode

  def send_signal(self, sig: int) -> None:
    if self.poll() is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def terminate(self) -> None:
    self.send_signal(signal.SIGTERM)

  def communicate(self, timeout: float | None = None):
    results = {}

    def drain(name, stream):
      results[name] = stream.read()
      stream.close()

    readers = [
      threading.Thread(target=drain, args=(name, stream), daemon=True)
      for name, stream in (("stdout", self.stdout), ("stderr", self.stderr))
      if stream is not None and not stream.closed
    ]
    for reader in readers:
      reader.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for reader in readers:
      reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
      if reader.is_alive():
        raise subprocess.TimeoutExpired(self.args, timeout)
    self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return results.get("stdout"), results.get("stderr")


def _stream(spec, default: int, opened: list[int], keep: list):
  """(fd for the child, the client's end or None) of a Popen stdout/stderr argument."""
  if spec is None:
    return default, None
  if spec == subprocess.DEVNULL:
    fd = os.open(os.devnull, os.O_RDWR)
    opened.append(fd)
    return fd, None
  if spec == subprocess.PIPE:
    read, write = os.pipe()
    opened.append(write)
    keep.append(read)
    return write, read
  return spec.fileno(), None


def spawn(
  args: list[str],
  *,
  cwd: str,
  env: dict,
  stdout=None,
  stderr=None,
  text: bool = False,
  start_new_session: bool = False,
):
  """``subprocess.Popen(args, ...)`` for ``args`` = [python, "-m", MODULE, *ARGS]: a fork of the
  server where it serves ``env``, else a fresh interpreter (a ``subprocess.Popen``)."""
  server = _the_server() if args[:2] == [sys.executable, "-m"] else None
  forked = server is not None and server.serves(env)
  if os.environ.get("LOOM_TESTS_FORK_SERVER_LOG"):  # which commands were forked, and why not
    with open(os.environ["LOOM_TESTS_FORK_SERVER_LOG"], "a") as log:
      differ = [] if server is None else sorted(server.differences(env))
      log.write(f"{'fork' if forked else 'fresh'} {' '.join(args[2:4])} {differ}\n")
  if not forked:
    return subprocess.Popen(
      args,
      cwd=cwd,
      env=env,
      stdout=stdout,
      stderr=stderr,
      text=text,
      start_new_session=start_new_session,
    )
  opened: list[int] = []
  ends: list[int] = []
  null = os.open(os.devnull, os.O_RDONLY)
  opened.append(null)
  try:
    out_fd, out_end = _stream(stdout, 1, opened, ends)
    if stderr == subprocess.STDOUT:
      err_fd, err_end = out_fd, None
    else:
      err_fd, err_end = _stream(stderr, 2, opened, ends)
    request = {
      "module": args[2],
      "args": list(args[3:]),
      "cwd": os.path.abspath(cwd),
      "env": dict(env),
      "new_session": start_new_session,
    }
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(server.path)
    message = json.dumps(request).encode() + b"\n"
    sent = socket.send_fds(connection, [message], [null, out_fd, err_fd])
    connection.sendall(message[sent:])
  except BaseException:
    for fd in ends:
      os.close(fd)
    raise
  finally:
    for fd in opened:
      os.close(fd)  # the child has its own copies: the pipes end when it does
  reply = b""
  while not reply.endswith(b"\n"):
    chunk = connection.recv(4096)
    if not chunk:
      raise RuntimeError("the fork server closed the connection before starting the command")
    reply += chunk
  first, _, rest = reply.partition(b"\n")
  pid = json.loads(first)["pid"]

  def wrap(fd):
    if fd is None:
      return None
    return open(fd, "r" if text else "rb", closefd=True)  # noqa: SIM115 - the caller's stream

  return Forked(connection, pid, wrap(out_end), wrap(err_end), args, rest)


def run(
  args: list[str], *, cwd: str, env: dict, capture_output: bool = False, text: bool = False,
  timeout: float | None = None,
) -> subprocess.CompletedProcess:  # fmt: skip
  """``subprocess.run(args, ...)`` through ``spawn``."""
  pipe = subprocess.PIPE if capture_output else None
  process = spawn(args, cwd=cwd, env=env, stdout=pipe, stderr=pipe, text=text)
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.communicate()
    raise
  return subprocess.CompletedProcess(args, process.returncode, out, err)


if __name__ == "__main__":
  _serve(sys.argv[1])
