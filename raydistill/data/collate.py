"""Collation of signal rows into micro-batches, vectorised: ``collate``.

The per-token version (``collate_rowwise``, kept at the end as the reference) walks every target
token in Python (an append and an ``np.asarray`` each),
which costs microseconds per token; a GPU student consumes hundreds of thousands of tokens a
second. Here every list column becomes Arrow offsets plus one flat values buffer, and the
targets are gathered with ``np.repeat`` / fancy indexing: no Python work per token or per row.

The batch may come in either form Ray Data hands out:

* ``iter_batches(batch_format="pyarrow")`` (a ``pa.Table``, what training uses): used as it is, zero-copy;
* ``iter_batches(batch_format="numpy")``: list columns are
  object arrays of arrays, ``list<list<x>>`` ones object arrays of object arrays of ``x`` arrays.
  They are turned back into Arrow with one typed ``pa.array`` call per column, which walks the
  position arrays in C++ (tens of ns each). Plain Python lists and per-row 2-D arrays work too.

Per-position columns (``PER_POSITION_COLUMNS``) hold one entry per position t >= target_start, as
``topk_ids`` does, and are gathered the same way: ``list<list<x>>`` ones to [M, K], ``list<x>``
ones to [M]. ``target_logprob`` (the teacher's log-prob of the target token itself, not yet in
the schema) is collated whenever a batch has it; a future column needs one line in that table.

Masked top-k entries (id -1, log-prob -inf: the padding of a several-teacher mixture,
``raydistill.teacher.ensemble``) pass through as they are; the losses ignore them. Columns that
are padding at every target of the batch are dropped (``drop_padding_columns``): the mixture is
stored at the widest union any position can have, and the loss need only pay for the widest
union in its micro-batch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# name -> (output dtype, required). Required ones are read by ``collate`` today.
PER_POSITION_COLUMNS: dict[str, tuple[type, bool]] = {
    "topk_ids": (np.int64, True),
    "topk_logprobs": (np.float32, True),
    "target_logprob": (np.float32, False),
}


def collate(rows, max_seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch of signal rows -> padded arrays for the student; exactly what ``collate_rowwise`` returns.

    input_ids/attention_mask [B, T] (int64), and for the M target tokens of the batch (flattened,
    row-major): ``pred_pos`` [M, 2] (row, position whose logits predict the target), ``targets``
    [M], ``topk_ids`` [M, K] int64, ``topk_logprobs`` [M, K] float32 ([0, 1] when M == 0, as
    ``collate_rowwise``), plus [M] or [M, K] for each optional per-position column present. Sequences
    longer than ``max_seq_len`` are cut from the right, dropping their last targets.
    """
    tok_off, tok_vals = _offsets(_as_list_array(rows["input_ids"], 1))
    starts = np.asarray(rows["target_start"]).astype(np.int64)
    lens = np.minimum(np.diff(tok_off), max_seq_len)
    width = int(lens.max())  # an empty batch raises, as in collate
    cols = np.arange(width)
    keep = cols < lens[:, None]
    input_ids = np.full((len(lens), width), pad_id, dtype=np.int64)
    input_ids[keep] = tok_vals[(tok_off[:-1, None] + cols)[keep]]

    # Position t's token is predicted by the logits at t - 1; position 0 (BOS) is never a target.
    row, t = _ranges(np.maximum(starts, 1), lens)
    out = {
        "input_ids": input_ids,
        "attention_mask": keep.astype(np.int64),
        "pred_pos": np.stack([row, t - 1], axis=1),
        "targets": tok_vals[tok_off[row] + t].astype(np.int64),
    }
    present = getattr(rows, "column_names", rows)
    for name, (dtype, required) in PER_POSITION_COLUMNS.items():
        if required or name in present:
            out[name] = _gather(rows[name], row, t - starts[row], dtype)
    return drop_padding_columns(out)


# The [M, K] columns whose entries are masked where topk_ids is negative.
_TOPK_COLUMNS = ("topk_ids", "topk_logprobs")


def drop_padding_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the top-k columns that are masked (id < 0) at every target of ``batch``, in place; returns it.

    One column is always kept, so that ``topk_ids[:, 0]`` (the top-1) exists. A batch without
    masked entries is returned untouched.
    """
    ids = batch["topk_ids"]
    keep = (ids >= 0).any(axis=0)
    if keep.all() or not len(ids):
        return batch
    keep[0] = True
    for name in _TOPK_COLUMNS:
        batch[name] = batch[name][:, keep]
    return batch


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each b, the integers lo[b] <= t < hi[b]: (b, t) for all of them, row-major, without a loop."""
    counts = np.maximum(hi - lo, 0)
    ends = np.cumsum(counts)
    row = np.repeat(np.arange(len(counts)), counts)
    return row, lo[row] + np.arange(ends[-1] if len(ends) else 0) - (ends - counts)[row]


def _gather(column, row: np.ndarray, j: np.ndarray, dtype) -> np.ndarray:
    """Entry j[m] of row row[m]'s per-position list, for each target m: [M] or [M, K]."""
    if not len(row):  # collate never looks at the column then, and cannot know K
        return np.zeros((0, 1), dtype)
    arr = _as_list_array(column, _depth(column))
    pos_off, pos = _offsets(arr, values=False)
    if (j >= np.diff(pos_off)[row]).any():
        raise IndexError("a row has fewer per-position entries than target positions (len(input_ids) - target_start)")
    flat = pos_off[row] + j
    if not isinstance(pos, (pa.ListArray, pa.LargeListArray)):
        return pos.to_numpy(zero_copy_only=False)[flat].astype(dtype, copy=False)
    inner_off, leaf = _offsets(pos)
    widths = np.diff(inner_off)
    k = widths[flat]
    if (k != k[0]).any():
        raise ValueError(f"every target position must hold the same number of entries, got {sorted(set(k.tolist()))[:5]}")
    k = int(k[0])
    if k and (widths == k).all():  # the usual layout: the leaf values are one [positions, K] matrix
        return leaf[inner_off[0] : inner_off[-1]].reshape(-1, k)[flat].astype(dtype, copy=False)
    return leaf[inner_off[flat][:, None] + np.arange(k)].astype(dtype, copy=False)


def _offsets(arr, values: bool = True):
    """A (large) list array -> (its offsets as int64, into the child), child values (numpy, or the Arrow child)."""
    off = arr.offsets.to_numpy().astype(np.int64)  # absolute into .values, which ignores a slice
    return off, (arr.values.to_numpy(zero_copy_only=False) if values else arr.values)


def _depth(column) -> int:
    """1 for a list<x> column, 2 for list<list<x>>."""
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        return 2 if pa.types.is_list(column.type.value_type) or pa.types.is_large_list(column.type.value_type) else 1
    leaf = _first_nonempty(column, 1)
    return 1 if leaf is None or np.ndim(leaf[0]) == 0 else 2


def _first_nonempty(column, depth: int):
    """The first non-empty list ``depth`` levels down (a row's ids at 1, a position's top-k at 2), or None."""
    x = column
    for _ in range(depth):
        x = next((e for e in x if len(e)), None)
        if x is None:
            return None
    return x


def _as_list_array(column, depth: int) -> pa.Array:
    """A list column as one Arrow list array of ``depth`` levels."""
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    if isinstance(column, pa.Array):
        return column
    leaf = _first_nonempty(column, depth)
    typ = None  # Python lists: let Arrow infer (int64 / double), as np.asarray would
    if isinstance(leaf, np.ndarray) and leaf.dtype.kind in "biuf":
        # Naming the type lets pyarrow copy each position's array whole; inferring it costs 10x.
        typ = pa.from_numpy_dtype(leaf.dtype)
        for _ in range(depth):
            typ = pa.list_(typ)
    try:
        return pa.array(column, type=typ)
    except pa.ArrowInvalid:  # pyarrow takes only 1-D ndarrays as list values, not a row's [L, K] array
        return pa.array([list(r) for r in column], type=typ)


def collate_rowwise(rows: dict[str, np.ndarray], max_seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The per-token reference implementation of ``collate`` (the test oracle and the benchmark baseline).

    Returns input_ids/attention_mask [B, T], and for the M target tokens of the batch (flattened,
    row-major): ``pred_pos`` [M, 2] (row, position whose logits predict the target), ``targets`` [M],
    ``topk_ids`` [M, K], ``topk_logprobs`` [M, K]. Sequences longer than ``max_seq_len`` are cut
    from the right, dropping their last targets.
    """
    seqs = [np.asarray(s, dtype=np.int64)[:max_seq_len] for s in rows["input_ids"]]
    width = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    pred_pos, targets, topk_ids, topk_lp = [], [], [], []
    for b, (seq, start, ids, lps) in enumerate(zip(seqs, rows["target_start"], rows["topk_ids"], rows["topk_logprobs"])):
        input_ids[b, : len(seq)] = seq
        mask[b, : len(seq)] = 1
        start = int(start)
        # Position t's token is predicted by the logits at t - 1; position 0 (BOS) is never a target.
        for t in range(max(start, 1), len(seq)):
            j = t - start
            pred_pos.append((b, t - 1))
            targets.append(seq[t])
            topk_ids.append(np.asarray(ids[j], dtype=np.int64))
            topk_lp.append(np.asarray(lps[j], dtype=np.float32))
    k = len(topk_ids[0]) if topk_ids else 1
    return drop_padding_columns({
        "input_ids": input_ids,
        "attention_mask": mask,
        "pred_pos": np.asarray(pred_pos, dtype=np.int64).reshape(-1, 2),
        "targets": np.asarray(targets, dtype=np.int64),
        "topk_ids": np.stack(topk_ids) if topk_ids else np.zeros((0, k), np.int64),
        "topk_logprobs": np.stack(topk_lp) if topk_lp else np.zeros((0, k), np.float32),
    })
