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
"""

import sys
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


def main(port: int) -> None:
  # Concurrent clients: the emulator serves from one http.server.HTTPServer, whose listen backlog
  # of 5 drops the 6th simultaneous connection until a SYN retransmit a second later; GCS takes
  # many. A deeper backlog queues them instead (the store's parallel range reads need it).
  http_server.HTTPServer.request_queue_size = 128
  # Patched before the server module builds its routing table from these functions.
  objects.download = _download(objects.download)
  objects.insert = _insert(objects.insert)
  from gcp_storage_emulator.server import create_server

  create_server("127.0.0.1", port, in_memory=True, default_bucket="loom").run()


if __name__ == "__main__":
  main(int(sys.argv[1]))
