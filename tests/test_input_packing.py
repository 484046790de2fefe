"""Packing and batch construction (pure numpy): boundaries, positions, lengths, weights."""

import numpy as np
import pytest

from input_pipeline import packing

EOD, PAD = 256, 257


def _pack(docs, seq_len, monkeypatch=None, block=None):
  if block is not None:
    monkeypatch.setattr(packing, "_BLOCK_TOKENS", block)
  packer = packing.Packer(seq_len, EOD, PAD, np.uint16)
  blocks = []
  for doc in docs:
    blocks += list(packer.add(np.asarray(doc, np.uint16)))
  blocks += list(packer.finish())
  return packer, [np.concatenate(parts) for parts in zip(*blocks, strict=True)]


def _random_docs(rng, n=60, longest=90):
  # Lengths include 0 (an empty document is just eod) and documents longer than a row.
  return [rng.integers(0, 256, rng.integers(0, longest)) for _ in range(n)]


@pytest.mark.parametrize("block", [None, 7, 64])
def test_rows_reassemble_the_stream_with_exact_lengths(monkeypatch, block):
  rng = np.random.default_rng(0)
  docs, seq_len = _random_docs(rng), 16
  packer, (tokens, segs, pos) = _pack(docs, seq_len, monkeypatch, block or packing._BLOCK_TOKENS)
  assert tokens.shape == segs.shape == pos.shape == (len(tokens), seq_len + 1)
  stream = np.concatenate([np.append(d, EOD) for d in docs])
  # Rows overlap by one token: row r is stream[r * seq_len : r * seq_len + seq_len + 1].
  rebuilt = np.concatenate([tokens[0]] + [row[1:] for row in tokens[1:]])
  real = np.concatenate([segs[0] != 0] + [row[1:] != 0 for row in segs[1:]])
  np.testing.assert_array_equal(rebuilt[real], stream)
  # Padding only at the very end of the last row.
  assert (segs[:-1] != 0).all()
  assert np.all(np.diff((segs[-1] == 0).astype(int)) >= 0)
  assert packer.num_documents == len(docs)
  assert packer.efficiency == pytest.approx(np.count_nonzero(segs) / segs.size)
  assert packer.real_slots == np.count_nonzero(segs)
  assert packer.total_slots == segs.size


def test_segments_change_exactly_at_document_boundaries_and_positions_restart():
  rng = np.random.default_rng(1)
  _, (tokens, segs, pos) = _pack(_random_docs(rng), 12)
  for tok_row, seg_row, pos_row in zip(tokens, segs, pos, strict=True):
    assert seg_row[0] == 1 and pos_row[0] == 0  # each row opens a fresh piece
    for c in range(1, len(tok_row)):
      if seg_row[c] == 0:
        assert pos_row[c] == 0 and tok_row[c] == PAD
        continue
      if tok_row[c - 1] == EOD:  # a new document starts right after eod
        assert seg_row[c] == seg_row[c - 1] + 1 and pos_row[c] == 0
      else:
        assert seg_row[c] == seg_row[c - 1] and pos_row[c] == pos_row[c - 1] + 1
  assert pos.max() <= 12


def test_make_batch_weights_predict_eod_but_not_across_documents():
  # Two documents [1, 2] and [3, 4, 5] fill exactly one row of seq_len 6.
  _, (tokens, segs, pos) = _pack([[1, 2], [3, 4, 5]], 6)
  np.testing.assert_array_equal(tokens, [[1, 2, EOD, 3, 4, 5, EOD]])
  np.testing.assert_array_equal(segs, [[1, 1, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 2, 3]])
  batch = packing.make_batch(tokens, segs, pos)
  np.testing.assert_array_equal(batch["inputs"], [[1, 2, EOD, 3, 4, 5]])
  np.testing.assert_array_equal(batch["targets"], [[2, EOD, 3, 4, 5, EOD]])
  np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 0, 1, 2]])
  # eod is predicted from "2"; "3" is not predicted from eod.
  np.testing.assert_array_equal(batch["weights"], [[1, 1, 0, 1, 1, 1]])
  assert {k: v.dtype for k, v in batch.items()} == {
    "inputs": np.int32,
    "targets": np.int32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "weights": np.float32,
  }


def test_padding_gets_zero_weight_and_efficiency_counts_it():
  packer, (tokens, segs, pos) = _pack([[1, 2, 3]], 8)  # 4 real tokens in a row of 9
  np.testing.assert_array_equal(segs, [[1, 1, 1, 1, 0, 0, 0, 0, 0]])
  batch = packing.make_batch(tokens, segs, pos)
  np.testing.assert_array_equal(batch["weights"], [[1, 1, 1, 0, 0, 0, 0, 0]])
  assert packer.efficiency == pytest.approx(4 / 9)


def test_long_document_continues_in_new_piece():
  _, (tokens, segs, pos) = _pack([list(range(20))], 8)  # 21 tokens with eod: rows of 9, overlap 1
  assert tokens.shape == (3, 9)
  np.testing.assert_array_equal(tokens[1], list(range(8, 17)))
  np.testing.assert_array_equal(pos[1], np.arange(9))  # the continuation restarts its positions
  assert (segs[:2] == 1).all()


def test_bad_seq_len():
  with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
    packing.Packer(0, EOD, PAD, np.uint16)


def test_row_dtype():
  assert packing.row_dtype(257) == np.uint16
  assert packing.row_dtype(70000) == np.int32
