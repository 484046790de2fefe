"""Packing token streams into fixed-length rows, and rows into model batches (pure numpy).

Scheme ("stream, overlap 1"): every document is tokenized and terminated with the tokenizer's
end-of-document id, the documents are concatenated into one stream, and row r holds stream tokens
[r * seq_len, r * seq_len + seq_len] (seq_len + 1 tokens). Consecutive rows share one token, so each
next-token pair of the stream is a target exactly once, and only the very last row carries padding.

Within a row, `segment_ids` number the document pieces 1, 2, 3, ... (0 = padding) and `positions`
count from 0 at the start of each piece. A document that runs past the end of a row continues in
the next row as a new piece whose positions restart at 0: positions therefore never exceed seq_len,
which keeps learned position tables and RoPE in their trained range.
"""

from collections.abc import Iterator

import numpy as np

# Rows are emitted in blocks of about this many tokens: big enough that numpy's per-call overhead
# vanishes, small enough that memory stays flat for corpora of any size.
_BLOCK_TOKENS = 1 << 20


def row_dtype(max_value: int) -> np.dtype:
  """The smallest stored dtype that holds values up to max_value (uint16, else int32)."""
  return np.dtype(np.uint16) if max_value < (1 << 16) else np.dtype(np.int32)


def rows_from_stream(
  tokens_T: np.ndarray,
  starts_T: np.ndarray,
  seq_len: int,
  pad_id: int,
  mask_T: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
  """Cuts a stream into rows: ([R, seq_len + 1] tokens, segment_ids, positions[, loss_mask]).

  tokens_T holds whole rows' worth of tokens (T = R * seq_len + 1) or, for the final row, fewer,
  which are padded. starts_T[t] is True where a document starts in the stream. mask_T (chat
  data) marks the tokens that may be targets; its rows come back as a fourth array.
  """
  width = seq_len + 1
  num_rows = max(0, -(-(len(tokens_T) - 1) // seq_len))
  padded = num_rows * seq_len + 1
  valid_T = np.zeros(padded, bool)
  valid_T[: len(tokens_T)] = True
  tok = np.full(padded, pad_id, tokens_T.dtype)
  tok[: len(tokens_T)] = tokens_T
  st = np.zeros(padded, bool)
  st[: len(starts_T)] = starts_T
  # Row r starts at stream offset r * seq_len; the index view shares the overlap token.
  index_RW = np.arange(num_rows)[:, None] * seq_len + np.arange(width)[None, :]
  tokens_RW = tok[index_RW]
  valid_RW = valid_T[index_RW]
  starts_RW = st[index_RW]
  starts_RW[:, 0] = True  # every row opens a new piece, so attention never reaches the previous row
  segment_ids_RW = np.cumsum(starts_RW, axis=1)
  segment_ids_RW[~valid_RW] = 0
  col_W = np.arange(width)
  last_start_RW = np.maximum.accumulate(np.where(starts_RW, col_W, 0), axis=1)
  positions_RW = col_W[None, :] - last_start_RW
  positions_RW[~valid_RW] = 0
  if mask_T is None:
    return tokens_RW, segment_ids_RW, positions_RW
  mask = np.zeros(padded, np.uint8)
  mask[: len(mask_T)] = mask_T
  return tokens_RW, segment_ids_RW, positions_RW, mask[index_RW]


class Packer:
  """Streams documents into rows of seq_len + 1 tokens, holding at most about one block in memory.

  Feed token arrays (one per document, without eod) with `add`; collect rows from the iterator
  `add` and `finish` return. Counts of real and padding slots give the packing efficiency.
  """

  def __init__(
    self, seq_len: int, eod_id: int, pad_id: int, token_dtype: np.dtype, with_mask: bool = False
  ):
    if seq_len < 1:
      raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    self.seq_len = seq_len
    self.eod_id = eod_id
    self.pad_id = pad_id
    self.token_dtype = np.dtype(token_dtype)
    self._tokens: list[np.ndarray] = []
    self._starts: list[np.ndarray] = []
    self._masks: list[np.ndarray] | None = [] if with_mask else None
    self._pending = 0
    self.num_documents = 0
    self.real_slots = 0
    self.total_slots = 0

  def add(
    self, doc_tokens: np.ndarray, mask: np.ndarray | None = None
  ) -> Iterator[tuple[np.ndarray, ...]]:
    """Appends one document (eod is added here) and yields any block of complete rows.

    ``mask`` (with_mask only): one flag per token of the document and one for its eod.
    """
    tokens = np.empty(len(doc_tokens) + 1, self.token_dtype)
    tokens[:-1] = doc_tokens
    tokens[-1] = self.eod_id
    starts = np.zeros(len(tokens), bool)
    starts[0] = True
    self._tokens.append(tokens)
    self._starts.append(starts)
    if self._masks is not None:
      self._masks.append(np.asarray(mask, np.uint8))
    self._pending += len(tokens)
    self.num_documents += 1
    if self._pending >= _BLOCK_TOKENS:
      yield from self._flush(final=False)

  def finish(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields the remaining rows; the last one is padded."""
    yield from self._flush(final=True)

  def _flush(self, final: bool) -> Iterator[tuple[np.ndarray, ...]]:
    if not self._tokens:
      return
    streams = [np.concatenate(self._tokens), np.concatenate(self._starts)]
    if self._masks is not None:
      streams.append(np.concatenate(self._masks))
    length = len(streams[0])
    full_rows = (length - 1) // self.seq_len
    # Keep the tail (it starts with the overlap token, the last target of the last full row).
    cut = full_rows * self.seq_len
    if final:
      emit = streams if length > 1 else [x[:0] for x in streams]
      kept = None
      self._pending = 0
    else:
      emit = [x[: cut + 1] for x in streams]
      kept = [x[cut:] for x in streams]
      self._pending = length - cut
    self._tokens = [kept[0]] if kept else []
    self._starts = [kept[1]] if kept else []
    if self._masks is not None:
      self._masks = [kept[2]] if kept else []
    if len(emit[0]) < 2:
      return
    mask = emit[2] if self._masks is not None else None
    rows = rows_from_stream(emit[0], emit[1], self.seq_len, self.pad_id, mask)
    self.real_slots += int(np.count_nonzero(rows[1]))
    self.total_slots += rows[0].size
    yield rows

  @property
  def efficiency(self) -> float:
    """Non-padding fraction of the row slots emitted so far."""
    return self.real_slots / self.total_slots if self.total_slots else 0.0


def make_batch(
  tokens_BW: np.ndarray,
  segment_ids_BW: np.ndarray,
  positions_BW: np.ndarray,
  loss_mask_BW: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Rows of seq_len + 1 -> the model batch: inputs/targets/positions/segment_ids/weights [B, L].

  With a loss mask (chat data) a target counts only where the mask marks it trainable.
  """
  segment_ids_BW = segment_ids_BW.astype(np.int32)
  in_seg_BL = segment_ids_BW[:, :-1]
  out_seg_BL = segment_ids_BW[:, 1:]
  # A target counts only if it is a real token of the input's own document: eod is predicted from
  # its document's last token, the next document's first token is not predicted from eod.
  weights_BL = ((in_seg_BL == out_seg_BL) & (out_seg_BL != 0)).astype(np.float32)
  if loss_mask_BW is not None:
    weights_BL *= loss_mask_BW[:, 1:].astype(np.float32)
  return {
    "inputs": tokens_BW[:, :-1].astype(np.int32),
    "targets": tokens_BW[:, 1:].astype(np.int32),
    "positions": positions_BW[:, :-1].astype(np.int32),
    "segment_ids": in_seg_BL,
    "weights": weights_BL,
  }


class PairPacker:
  """Packs preference pairs (``input_pipeline/preference.py``) whole into rows of seq_len + 1.

  Why pairs share a row: a row is the unit everything downstream moves (the step-indexed sampler
  permutes rows, each process reads its own rows, the batch is sharded by rows and micro-batches
  take rows). A pair packed as two adjacent segments of one row (chosen = segment 2k - 1,
  rejected = segment 2k) therefore stays together in every batch, on every device and in every
  micro-batch, with no change to the sampler, the store format or the sharding; the segment ids
  keep the two sequences from attending to each other and their positions restart at 0, as if
  each were alone. Several pairs share a row (first fit in order), which paired rows (one row
  per sequence, padded) would waste. A pair longer than a row is skipped and counted.
  """

  def __init__(self, seq_len: int, pad_id: int, token_dtype: np.dtype, rows_per_block: int = 1024):
    self.width = seq_len + 1
    self.pad_id = pad_id
    self.token_dtype = np.dtype(token_dtype)
    self.rows_per_block = rows_per_block
    self._rows: list[tuple[np.ndarray, ...]] = []
    self._row: list[tuple[np.ndarray, np.ndarray]] = []  # the open row's (ids, mask) segments
    self._used = 0
    self.num_documents = 0  # pairs packed
    self.too_long = 0  # pairs longer than a row, skipped
    self.real_slots = 0
    self.total_slots = 0

  def add(
    self, chosen: np.ndarray, chosen_mask: np.ndarray, rejected: np.ndarray, rejected_mask
  ) -> Iterator[tuple[np.ndarray, ...]]:
    """Places one pair (each sequence already ends as input_pipeline/preference.py ends it) and
    yields full blocks of rows."""
    size = len(chosen) + len(rejected)
    if size > self.width:
      self.too_long += 1
      return
    if self._used + size > self.width:
      self._close_row()
    self._row += [(chosen, chosen_mask), (rejected, rejected_mask)]
    self._used += size
    self.num_documents += 1
    if len(self._rows) >= self.rows_per_block:
      yield self._block()

  def finish(self) -> Iterator[tuple[np.ndarray, ...]]:
    self._close_row()
    if self._rows:
      yield self._block()

  def _close_row(self) -> None:
    if not self._row:
      return
    tokens = np.full(self.width, self.pad_id, self.token_dtype)
    segment_ids, positions, mask = (np.zeros(self.width, np.int64) for _ in range(3))
    start = 0
    for number, (ids, flags) in enumerate(self._row, start=1):
      stop = start + len(ids)
      tokens[start:stop] = ids
      segment_ids[start:stop] = number
      positions[start:stop] = np.arange(len(ids))
      mask[start:stop] = flags
      start = stop
    self._rows.append((tokens, segment_ids, positions, mask.astype(np.uint8)))
    self.real_slots += start
    self.total_slots += self.width
    self._row, self._used = [], 0

  def _block(self) -> tuple[np.ndarray, ...]:
    block = tuple(np.stack(arrays) for arrays in zip(*self._rows, strict=True))
    self._rows = []
    return block

  @property
  def efficiency(self) -> float:
    return self.real_slots / self.total_slots if self.total_slots else 0.0
