"""Replicas of local steps on a peer, copied over TCP between the processes' own threads.

Each process runs a small server (``PeerService``) on an ephemeral port of the interface it
reaches the coordinator through; the addresses are exchanged once through the coordination
service. After writing a local step, a process sends it (``send``) to the next process, which
writes it under ``replica_of_<owner>/``; a process that comes back without its own copy asks the
holder for it (``fetch``).

Why TCP and not the two ways the cluster already has (docs/reliability.md has the numbers): the
coordination service's key-value store moved ~32 MB/s between two processes here (every byte
through the coordinator's gRPC server), and a JAX collective (``ppermute``) moved ~430 MB/s but
must be issued on the training thread, in the same order on every process as the train step's
own collectives, so it would hold the step for the whole copy. A socket between the two hosts'
own threads moves the bytes beside the steps, at the network's speed.

The protocol: one JSON line (a request or a reply), then the step's manifest and data bytes, whose
lengths the line gives. Every request names the run id; another run's request is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from input_pipeline.host import agreement
from train.checkpoint import local_files

log = logging.getLogger("loom")

TIMEOUT_S = 300.0  # one copy's socket timeout: a peer that stops answering is given up
_BLOCK = 1 << 22


class PeerCopyError(RuntimeError):
  """A copy to or from a peer failed (the peer said why, or the connection did)."""


def _reachable_ip() -> str:
  """This host's address as the other processes reach it: the interface towards the
  coordinator (127.0.0.1 for a cluster on one machine)."""
  host = agreement.coordinator_host()
  if host in ("127.0.0.1", "localhost", "::1"):
    return "127.0.0.1"
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect((host, 9))  # no packet is sent: this only picks the route
    return s.getsockname()[0]


def _read_line(sock: socket.socket) -> dict:
  line = bytearray()
  while not line.endswith(b"\n"):
    byte = sock.recv(1)
    if not byte:
      raise PeerCopyError("the peer closed the connection")
    line += byte
  return json.loads(line)


def _read_exact(sock: socket.socket, size: int) -> bytes:
  buffer = bytearray(size)
  view, got = memoryview(buffer), 0
  while got < size:
    n = sock.recv_into(view[got:], min(size - got, _BLOCK))
    if not n:
      raise PeerCopyError(f"the peer closed the connection after {got} of {size} bytes")
    got += n
  return bytes(buffer)


def _read_chunks(sock: socket.socket, size: int):
  left = size
  while left:
    chunk = sock.recv(min(left, _BLOCK))
    if not chunk:
      raise PeerCopyError(f"the peer closed the connection with {left} bytes to come")
    left -= len(chunk)
    yield chunk


def _send_line(sock: socket.socket, message: dict) -> None:
  sock.sendall(json.dumps(message).encode() + b"\n")


class PeerService:
  """Serves this process's replicas and own steps to its peers, and receives their replicas.

  ``root`` is this process's local-tier directory: its own steps in ``own/``, the replicas it
  keeps for others in ``replica_of_<owner>/``.
  """

  def __init__(
    self, root: Path, run_id: str, keep: int, quarantine: Callable[[Path, int, str], Any]
  ):
    self.root, self.run_id, self.keep, self._quarantine = root, run_id, keep, quarantine
    self.received: list[tuple[int, int]] = []  # (owner, step) of each replica written here
    service = self

    class Handler(socketserver.BaseRequestHandler):
      def handle(self):
        self.request.settimeout(TIMEOUT_S)
        try:
          service._handle(self.request)
        except Exception as e:  # noqa: BLE001 - answered to the peer, logged here
          log.warning("local checkpoint tier: a peer's request failed: %s", e)
          with contextlib.suppress(OSError):
            _send_line(self.request, {"error": f"{type(e).__name__}: {e}"})

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    self._server = socketserver.ThreadingTCPServer(("0.0.0.0", 0), Handler)
    self._server.daemon_threads = True
    self.address = f"{_reachable_ip()}:{self._server.server_address[1]}"
    self._thread = threading.Thread(
      target=self._server.serve_forever, name="loom-local-peers", daemon=True
    )
    self._thread.start()

  def replica_dir(self, owner: int) -> Path:
    return self.root / f"replica_of_{owner}"

  def _handle(self, sock: socket.socket) -> None:
    request = _read_line(sock)
    if request.get("run") != self.run_id:
      raise PeerCopyError(f"request for run {request.get('run')!r}; this is run {self.run_id!r}")
    owner, step = int(request["owner"]), int(request["step"])
    if request["op"] == "put":
      manifest = _read_exact(sock, int(request["manifest_bytes"]))
      chunks = _read_chunks(sock, int(request["data_bytes"]))
      local_files.prune(self.replica_dir(owner), self.keep - 1, keep_step=step)
      local_files.write(self.replica_dir(owner), step, manifest, chunks)
      self.received.append((owner, step))
      _send_line(sock, {"ok": True})
    elif request["op"] == "get":
      where = self.root / "own" if request.get("own") else self.replica_dir(owner)
      path = local_files.step_dir(where, step)
      problem = local_files.verify(path)
      if problem:
        if path.exists():
          self._quarantine(path.parent, step, problem)
        raise PeerCopyError(f"no sound copy of step {step} of process {owner} here: {problem}")
      manifest = (path / local_files.MANIFEST).read_bytes()
      size = (path / local_files.DATA).stat().st_size
      _send_line(sock, {"manifest_bytes": len(manifest), "data_bytes": size})
      sock.sendall(manifest)
      for chunk in local_files.data_chunks(path):
        sock.sendall(chunk)
    else:
      raise PeerCopyError(f"unknown request {request['op']!r}")

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()


def exchange_addresses(service: PeerService | None) -> list[str]:
  """Every process's service address, in process order (on the training thread, in step)."""
  return agreement.gather("local-tier-peers", service.address if service else "")


def _connect(address: str) -> socket.socket:
  host, port = address.rsplit(":", 1)
  sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
  sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
  return sock


def send(
  address: str, run_id: str, owner: int, step: int, manifest: bytes, chunks: Iterable, size: int
) -> None:
  """Sends ``owner``'s step to the peer at ``address``; returns when the peer has sealed it."""
  with _connect(address) as sock:
    request = {"op": "put", "run": run_id, "owner": owner, "step": step}
    _send_line(sock, {**request, "manifest_bytes": len(manifest), "data_bytes": size})
    sock.sendall(manifest)
    for chunk in chunks:
      sock.sendall(chunk)
    reply = _read_line(sock)
  if not reply.get("ok"):
    raise PeerCopyError(f"peer {address} did not keep step {step}: {reply.get('error')}")


def fetch(address: str, run_id: str, owner: int, step: int, into: Path, *, own: bool) -> int:
  """Copies ``owner``'s step from the peer at ``address`` (its replica, or with ``own`` the
  peer's own copy) into the directory ``into``, sealed. Returns the bytes copied."""
  with _connect(address) as sock:
    _send_line(sock, {"op": "get", "run": run_id, "owner": owner, "step": step, "own": own})
    reply = _read_line(sock)
    if "error" in reply:
      raise PeerCopyError(f"peer {address} could not send step {step}: {reply['error']}")
    manifest = _read_exact(sock, int(reply["manifest_bytes"]))
    return local_files.write(into, step, manifest, _read_chunks(sock, int(reply["data_bytes"])))
