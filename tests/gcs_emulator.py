"""The GCS emulator of the tests: gcp-storage-emulator, plus GCS's generation preconditions.

``python tests/gcs_emulator.py PORT`` serves the GCS JSON API on 127.0.0.1:PORT from memory, with
the bucket ``loom``. gcp-storage-emulator (2026.7) implements the API the project uses, except
two documented behaviours that TensorStore's OCDBT format (Orbax's checkpoints) depends on to
commit its manifest safely: media downloads carry the object's ``x-goog-generation`` header, and
the ``ifGenerationMatch`` / ``ifGenerationNotMatch`` preconditions are honoured (412 Precondition
Failed, 304 Not Modified). Without them a revalidating read gets a body with no generation and
TensorStore fails with "Malformed StorageGeneration" (seen on about one save in ten). It also lets
many clients connect at once, as GCS does (a deeper listen backlog: the store's parallel range
reads). This file adds exactly those behaviours around the emulator's own server, then starts it.
https://cloud.google.com/storage/docs/request-preconditions

For the tests of failing saves it can also refuse uploads, as a store does when a permission is
withdrawn or a request is malformed: ``--fail REGEX:STATUS:COUNT`` (repeatable) answers STATUS
(e.g. 403) to the first COUNT uploads (0: all) whose object name matches REGEX; 503 to all of
them is a store that never accepts a write (the client retries with backoff for many minutes).
``--fail-log FILE`` gets one line per refused upload.
"""

import argparse
import re
import sys
import threading
from http import HTTPStatus
from http import server as http_server

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _generation(storage, bucket: str, name: str) -> int | None:
  try:
    return int(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return None


def _precondition(request, current: int | None) -> HTTPStatus | None:
  match = request.query.get("ifGenerationMatch")
  if match and (current or 0) != int(match[0]):
    return HTTPStatus.PRECONDITION_FAILED
  not_match = request.query.get("ifGenerationNotMatch")
  if not_match and current is not None and current == int(not_match[0]):
    return HTTPStatus.NOT_MODIFIED
  return None


def _download(original):
  def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params["bucket_name"], request.params["object_id"]
    current = _generation(storage, bucket, name)
    if current is not None:
      status = _precondition(request, current)
      if status is not None:
        response.status = status
        return None
      response["x-goog-generation"] = str(current)
      response["x-goog-metageneration"] = "1"
    return original(request, response, storage, *args, **kwargs)

  return download


def _insert(original):
  def insert(request, response, storage, *args, **kwargs):
    name = (request.query.get("name") or [None])[0]
    if name is not None and "ifGenerationMatch" in request.query:
      current = _generation(storage, request.params["bucket_name"], name)
      if _precondition(request, current) == HTTPStatus.PRECONDITION_FAILED:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
    return original(request, response, storage, *args, **kwargs)

  return insert


class _Refusal:
  """Answers ``status`` to the first ``count`` uploads whose name matches ``pattern``."""

  def __init__(self, spec: str, log_path: str | None):
    pattern, status, count = spec.rsplit(":", 2)
    self.pattern, self.status, self.left = re.compile(pattern), int(status), int(count)
    self.unlimited = self.left == 0
    self.log_path = log_path
    self.lock = threading.Lock()

  def refuses(self, name: str) -> bool:
    with self.lock:
      if not self.pattern.search(name) or not (self.unlimited or self.left > 0):
        return False
      self.left -= 1
      if self.log_path:
        with open(self.log_path, "a") as f:
          f.write(f"{self.status} {name}\n")
      return True


def _refusing(original, refusals: list[_Refusal]):
  def insert(request, response, storage, *args, **kwargs):
    name = (request.query.get("name") or [""])[0]
    for refusal in refusals:
      if refusal.refuses(name):
        response.status = HTTPStatus(refusal.status)
        response.json({"error": {"code": refusal.status, "message": "refused by the test"}})
        return None
    return original(request, response, storage, *args, **kwargs)

  return insert


def main(port: int, fail: list[str] | None = None, fail_log: str | None = None) -> None:
  # Concurrent clients: the emulator serves from one http.server.HTTPServer, whose listen backlog
  # of 5 drops the 6th simultaneous connection until a SYN retransmit a second later; GCS takes
  # many. A deeper backlog queues them instead (the store's parallel range reads need it).
  http_server.HTTPServer.request_queue_size = 128
  # Patched before the server module builds its routing table from these functions.
  objects.download = _download(objects.download)
  objects.insert = _insert(objects.insert)
  if fail:
    objects.insert = _refusing(objects.insert, [_Refusal(spec, fail_log) for spec in fail])
  from gcp_storage_emulator.server import create_server

  create_server("127.0.0.1", port, in_memory=True, default_bucket="loom").run()


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("port", type=int)
  parser.add_argument("--fail", action="append", help="REGEX:STATUS:COUNT: refuse uploads")
  parser.add_argument("--fail-log", help="a file that lists the refused uploads")
  args = parser.parse_args(sys.argv[1:])
  main(args.port, args.fail, args.fail_log)
