"""tests/fork_server.py: the commands the tests start as forks behave as fresh ones do for what the
tests read (arguments, working directory, environment, streams, exit codes, signals)."""

import os
import signal
import subprocess
import sys
import time

import fork_server
import pytest

PROBE = """
import json, os, sys, tempfile
print(json.dumps({
  "tmp": tempfile.gettempdir(),
  "argv": sys.argv[1:], "cwd": os.getcwd(), "flags": os.environ.get("XLA_FLAGS"),
  "marker": os.environ.get("LOOM_LOCAL_SCRATCH"), "imported": "train.trainer" in sys.modules,
  "session": os.getsid(0) == os.getpid(), "main": __name__,
  "train": sys.modules["train"].__file__ if "train" in sys.modules else None,
}))
print("to stderr", file=sys.stderr)
if sys.argv[1:] == ["sleep"]:
  import time
  time.sleep(60)
sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
"""


@pytest.fixture
def probe(tmp_path):
  (tmp_path / "loom_probe.py").write_text(PROBE)
  return [sys.executable, "-m", "loom_probe"], str(tmp_path)


def _env(**more):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  env.update(more)
  return env


def test_a_command_runs_as_a_fork_with_its_own_arguments_directory_environment_and_streams(probe):
  import json

  command, cwd = probe
  result = fork_server.run(
    [*command, "a", "3"], cwd=cwd, env=_env(LOOM_LOCAL_SCRATCH="x", TMPDIR=cwd),
    capture_output=True, text=True, timeout=60,
  )  # fmt: skip
  assert result.returncode == 3, result.stderr
  seen = json.loads(result.stdout.splitlines()[-1])
  assert seen["argv"] == ["a", "3"] and seen["cwd"] == cwd and seen["marker"] == "x"
  assert seen["main"] == "__main__" and not seen["session"] and seen["tmp"] == cwd
  # The server's imports are there before the command's first line: a fork, not a fresh start.
  assert seen["imported"] is True, fork_server._the_server().differences(_env())
  # This checkout's code, whatever an installed copy of Loom points at.
  assert seen["train"] == os.path.join(fork_server.REPO, "train", "__init__.py")
  # The session's compile flags are added to the command's own, as in a fresh process.
  assert seen["flags"].startswith("--xla_force_host_platform_device_count=2")
  assert os.environ["LOOM_TESTS_XLA_FLAGS"].split()[0] in seen["flags"]
  assert result.stderr.strip().endswith("to stderr")


def test_a_killed_fork_reports_the_signal_and_its_session_is_its_own(probe):
  command, cwd = probe
  process = fork_server.spawn(
    [*command, "sleep"], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL, text=True, start_new_session=True,
  )  # fmt: skip
  assert isinstance(process, fork_server.Forked), fork_server._the_server().differences(_env())
  assert process.poll() is None
  line = process.stdout.readline()
  assert '"session": true' in line
  with pytest.raises(subprocess.TimeoutExpired):
    process.wait(timeout=0.2)
  os.killpg(process.pid, signal.SIGKILL)  # its own process group, as start_new_session gives
  assert process.wait(timeout=30) == -signal.SIGKILL
  assert process.poll() == -signal.SIGKILL and process.returncode == -signal.SIGKILL
  process.stdout.close()


def test_an_environment_the_imports_would_read_differently_starts_a_fresh_interpreter(probe):
  import json

  command, cwd = probe
  process = fork_server.spawn(
    command, cwd=cwd, env=_env(JAX_ENABLE_X64="1"), stdout=subprocess.PIPE, text=True
  )
  assert isinstance(process, subprocess.Popen)
  out, _ = process.communicate(timeout=60)
  assert process.returncode == 0 and json.loads(out.splitlines()[-1])["imported"] is False


def test_the_server_ends_with_its_client():
  """The pytest worker gone (its end of the server's stdin closed), the server leaves."""
  server = fork_server._Server()
  pid = server.process.pid
  server.process.stdin.close()
  deadline = time.monotonic() + 30
  while server.process.poll() is None:
    assert time.monotonic() < deadline, "the fork server outlived its client"
    time.sleep(0.05)
  assert server.process.returncode == 0 and pid > 0
  server.close()
