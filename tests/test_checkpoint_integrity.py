"""The checkpoint seal in per-process parts, and the mesh check that keeps tensor axes on a host."""

import json
import types

import numpy as np
import pytest

from train.checkpoint import integrity
from train.config import ConfigError, _check_tensor_within_hosts

FILES = {  # a two-process OCDBT checkpoint's layout (what Orbax writes), contents made up
  "_CHECKPOINT_METADATA": b"meta",
  "state/_METADATA": b"tree",
  "state/manifest.ocdbt": b"root manifest",
  "state/ocdbt.process_0/manifest.ocdbt": b"p0 manifest",
  "state/ocdbt.process_0/d/aaa": b"p0 shard" * 100,
  "state/ocdbt.process_1/manifest.ocdbt": b"p1 manifest",
  "state/ocdbt.process_1/d/bbb": b"p1 shard" * 100,
  "metadata/metadata": b"{}",
}


@pytest.fixture
def step_dir(tmp_path):
  step = tmp_path / "checkpoints" / "5"
  for rel, data in FILES.items():
    (step / rel).parent.mkdir(parents=True, exist_ok=True)
    (step / rel).write_bytes(data)
  return step


def test_each_process_seals_only_what_it_wrote(step_dir):
  assert integrity.writer_of("state/ocdbt.process_1/d/bbb", 2) == 1
  assert integrity.writer_of("state/_METADATA", 2) == 0
  assert integrity.writer_of("state/ocdbt.process_1/d/bbb", 1) == 0  # no such process now
  hashed_1 = integrity.seal(step_dir, process=1, num_processes=2)
  assert not integrity.is_sealed(step_dir)  # one part of two
  part_1 = json.loads((step_dir / "loom_checksums.1-of-2.json").read_text())
  assert sorted(part_1) == ["state/ocdbt.process_1/d/bbb", "state/ocdbt.process_1/manifest.ocdbt"]
  assert hashed_1 == len(FILES["state/ocdbt.process_1/d/bbb"]) + len(b"p1 manifest")
  # Process 0 lists the directory while another process's seal is still in its temporary file.
  in_flight = step_dir / ".loom_checksums.1-of-2.json.tmp.4242"
  in_flight.write_text("{")
  integrity.seal(step_dir, process=0, num_processes=2)
  in_flight.unlink()  # renamed into place by its writer
  part_0 = json.loads((step_dir / "loom_checksums.0-of-2.json").read_text())
  assert not any("loom_checksums" in rel for rel in part_0)
  assert integrity.is_sealed(step_dir)
  assert integrity.num_parts(step_dir) == 2
  assert integrity.verify(step_dir) == []
  lines, corrupt = integrity.verify_all(str(step_dir.parent.parent))  # the work directory
  assert (lines, corrupt) == (["step 5: ok"], 0)


def test_a_restoring_process_checks_its_parts_and_finds_damage_there(step_dir):
  for process in (0, 1):
    integrity.seal(step_dir, process=process, num_processes=2)
  (step_dir / "state/ocdbt.process_1/d/bbb").write_bytes(b"p1 shard" * 99 + b"p1 shbrd")
  assert integrity.verify(step_dir, parts=[0]) == []  # process 0's part is intact
  problems = integrity.verify(step_dir, parts=[1])
  assert len(problems) == 1 and "bbb: contents changed" in problems[0]
  (step_dir / "state/ocdbt.process_0/d/extra").write_bytes(b"?")
  assert any("extra: not part of the saved checkpoint" in p for p in integrity.verify(step_dir))


def test_a_part_sealed_by_more_processes_does_not_spoil_the_seal_of_fewer(step_dir):
  """Two processes were killed after process 0 of a three-process cluster had sealed its part;
  the run restored on one process (which seals the whole step) had read as corrupt: the extra
  files of the other count's processes "not part of the saved checkpoint"."""
  integrity.seal(step_dir, process=0, num_processes=3)
  assert integrity.num_parts(step_dir) == 3 and not integrity.is_sealed(step_dir)
  integrity.seal(step_dir, process=0, num_processes=1)  # the restore's seal, on one process
  assert integrity.is_sealed(step_dir) and integrity.num_parts(step_dir) == 1
  assert integrity.verify(step_dir) == []
  assert integrity.verify_all(str(step_dir.parent.parent))[1] == 0


def test_every_part_is_checked_exactly_once_on_any_process_count():
  for written_by in (1, 2, 3, 8):
    for now in (1, 2, 4, 5):
      parts = [p for process in range(now) for p in integrity.parts_for(process, now, written_by)]
      assert sorted(parts) == list(range(written_by)), (written_by, now)


def test_an_unsealed_checkpoint_is_not_corrupt(step_dir):
  assert integrity.verify(step_dir) == []
  assert not integrity.is_sealed(step_dir)
  # An empty step directory is no finished checkpoint: corrupt for verify, as for a restore.
  (step_dir.parent / "6").mkdir()
  lines, corrupt = integrity.verify_all(str(step_dir.parent))
  assert (corrupt, lines[1]) == (1, "step 6: CORRUPT")
  assert "incomplete: no state/_METADATA" in lines[2]


@pytest.mark.parametrize("content", ["[1, 2]", '{"state/_METADATA": 4}', "{garbage"])
def test_a_checksum_file_of_another_shape_is_corrupt_not_a_crash(step_dir, content):
  integrity.seal(step_dir, process=0, num_processes=1)
  (step_dir / "loom_checksums.0-of-1.json").write_text(content)
  problems = integrity.verify(step_dir)
  # One problem: the files are not called strangers for want of the table that lists them.
  assert len(problems) == 1 and "unreadable checksum file" in problems[0], problems


def _devices(process_of_id):
  return [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate(process_of_id)]


def test_a_tensor_axis_across_hosts_is_refused():
  # 2 processes × 4 devices: data=1, fsdp=2, tensor=4 keeps each tensor group on one host ...
  devices = np.array(_devices([0, 0, 0, 0, 1, 1, 1, 1]), dtype=object).reshape(1, 2, 4)
  _check_tensor_within_hosts(devices, ("data", "fsdp", "tensor"))
  # ... tensor=8 cannot.
  with pytest.raises(ConfigError, match=r"mesh.tensor=8 would span processes \[0, 1\]"):
    _check_tensor_within_hosts(devices.reshape(1, 1, 8), ("data", "fsdp", "tensor"))
  # Enumeration orders that interleave hosts are caught too.
  mixed = np.array(_devices([0, 1, 0, 1, 0, 1, 0, 1]), dtype=object).reshape(1, 4, 2)
  with pytest.raises(ConfigError, match="tensor parallelism must stay within one host"):
    _check_tensor_within_hosts(mixed, ("data", "fsdp", "tensor"))


def test_agreement_with_one_process_is_immediate():
  from input_pipeline.host import agreement

  assert agreement.from_main("x", "7") == "7"
  assert agreement.gather("y", "a") == ["a"]
  agreement.barrier("z", timeout_s=0.001)


def test_a_save_failure_is_told_in_one_line_that_keeps_what_classifies_it():
  """TensorStore puts the OS error after a long spec: the one-line cause is cut to ~400
  characters, yet a full disk must still read as one (no retry)."""
  from train.checkpoint.save_outcome import describe as _describe
  from train.checkpoint.save_outcome import permanent as _permanent

  spec = "tensorstore_spec=" + "{...}" * 200
  full_disk = ValueError(
    f"RESOURCE_EXHAUSTED: Error writing local file: {spec} [OS error 28: No space left on device]"
  )
  line = _describe(full_disk)
  assert len(line) < 450 and "\n" not in line
  assert line.startswith("ValueError: RESOURCE_EXHAUSTED") and _permanent(line)
  store_error = ValueError(f"Error writing in OCDBT database: {spec} [http_response_code='400']")
  assert not _permanent(_describe(store_error))  # may pass: the next save retries


def test_every_process_reaches_the_same_verdict_on_a_save_from_the_outcomes():
  from train.checkpoint import save_outcome as so

  store = "ValueError: Error writing [http_response_code='400']"
  disk = "ValueError: RESOURCE_EXHAUSTED ... [OS error 28: No space left on device]"
  assert so.decide(["", ""], failed_in_a_row=0, retries=2, last=False).action == "ok"
  retry = so.decide([so.PEER, store], failed_in_a_row=1, retries=2, last=False)
  assert retry.action == "retry" and retry.where == f"process 1: {store}"
  assert so.decide([store, so.PEER], failed_in_a_row=3, retries=2, last=False).why == (
    "3 failed saves in a row"
  )
  assert "last save" in so.decide([store, ""], failed_in_a_row=1, retries=2, last=True).why
  stuck = so.decide([store, so.PEER_STUCK], failed_in_a_row=1, retries=2, last=False)
  assert stuck.action == "stop" and "still waited" in stuck.why
  full = so.decide([disk, so.PEER], failed_in_a_row=1, retries=2, last=False)
  assert full.action == "stop" and full.why == ""  # the cause says it all
  late = [f"{so.UNFINISHED} after 15 s", so.PEER]
  late = so.decide(late, failed_in_a_row=1, retries=2, last=False)
  assert late.action == "interrupted"
