"""The teacher-signal contract: Parquet files under ``RUN/signals/``, one row per example.

Columns (``SIGNAL_SCHEMA``):

==============  ==========================  =====================================================
column          type                        meaning
==============  ==========================  =====================================================
id              string                      stable example id from the corpus (or a prompt hash)
split           string                      ``train`` or ``eval`` (stable hash split on ``id``)
input_ids       list<int32>                 the teacher's token ids of prompt + response (BOS first)
target_start    int32                       index of the first target (trained) token in input_ids
topk_ids        list<list<int32>>           per target position t >= target_start: the teacher's
                                            top-k token ids for input_ids[t], most likely first
topk_logprobs   list<list<float32>>         their raw (T=1) log-probs, same shape as topk_ids
prompt          string                      prompt text, for reports only
response        string                      response text, for reports only; never re-tokenized
                                            (generate mode: decoded once from the response ids)
==============  ==========================  =====================================================

``len(topk_ids) == len(input_ids) - target_start``. The tail mass at a position is implicit:
``1 - sum(exp(topk_logprobs))``. Training and evaluation read ``input_ids`` (the teacher's
own ids), never the text, so nothing is detokenized and re-tokenized on the way.

File-level metadata is written to ``signals/_signals.json`` next to the shards (teacher,
tokenizer fingerprint, k, mode, sampling, storage encoding). Ray Data writes the shards in
parallel and keeps no per-file Arrow schema metadata, so the sidecar is the one place the
description lives.

**On disk** (``STORED_SCHEMA``, zstd-compressed Parquet), ``topk_logprobs`` is replaced by a lossy
but tightly bounded encoding that the readers (``read_signals``, ``load_signals``) undo:

* ``tail_logprob`` list<float16>: per position, the log of the leftover probability
  ``1 - sum(exp(lp_j))`` (-inf for none). A half float of the log keeps the tail to 0.6 % of
  itself and the top-k mass ``1 - tail`` to 0.03 % at either extreme, in 2 bytes;
* ``topk_logprob_steps`` list<list<uint16>>: with ``q_j = round((lp_0 - lp_j) * scale)`` (the
  log-probs are sorted, so q is non-decreasing), the steps ``q_j - q_(j-1)`` for j >= 1. Small
  non-negative integers compress far better than floats. Quantizing the cumulative value, not
  each step, keeps every log-prob's offset from the top-1 within ``0.5 / scale`` nats, with no drift.

The reader rebuilds the top-k from the steps and shifts them all by one constant so that they sum
to ``1 - exp(tail_logprob)``. Storing the tail, rather than the top-1 log-prob, is what keeps the
stored distribution faithful where the teacher is confident: there the tail is ~1e-7, and
quantized log-probs alone can sum past 1 and erase it (a Gemma 3 run measured 2e-3 nats/token of KL
from that alone). The shift is a weighted mean of the quantization errors, so every decoded
log-prob is within ``1 / scale`` nats of the engine's (plus 3e-4 from the half-float tail).

* ``topk_ids`` holds codes, not ids: the teacher's ids renumbered so that frequent ids get small
  numbers (``id_order`` below), written without a dictionary and with Parquet's
  BYTE_STREAM_SPLIT encoding (``PARQUET_WRITE_ARGS``). Parquet's default dictionary encoding
  bit-packs every id at a fixed width (14 bits for a file's ~13,000 distinct ids on Gemma's
  262k vocabulary), which zstd cannot shrink; split into byte planes, the small codes' high
  bytes are nearly constant and zstd's entropy coder gets close to the ids' entropy
  (93 -> 78 B/token at k = 50 on Gemma 3, ``benchmarks/teacher_pass.py``).

The renumbering is one lossless permutation for the whole signals directory, recorded in the
metadata as ``topk_id_order``: the ids of the first engine batch's top-k, most frequent first,
get codes 0, 1, ...; every other id follows in id order (``ids_to_codes`` / ``codes_to_ids``).
Learning it from the teacher's own first outputs, not from the corpus or the tokenizer, is what
makes it match the ids the teacher actually ranks high (measured: 78 B/token for the first 16
rows' order, 82 for corpus token frequencies, 94 for no renumbering).

``scale`` is recorded in the metadata (``logprob_scale``). The default is 8 (from schema v7; 16 before):
the KL between the engine's top-k + tail distribution and the stored one is 3e-4 nats/token on Gemma 3's
262k vocabulary at k = 50 (7e-5 at 16; ``benchmarks/teacher_pass.py``), and each halving of the step
costs about one bit per entry in the coded layout below (~6 B/token at k = 50). In the Parquet layout
the steps stay under 256 distinct values, so Parquet's dictionary indices stay one byte wide.
Schema version 3 (ids stored as they are) and 2 (scale 64, the exact top-1 log-prob in
``top1_logprob`` instead of the tail) are still read.

**Masked entries.** Several teachers' mixtures (``raydistill.teacher.ensemble``) pad each position's
union of top-k lists to one width with entries of id -1 and log-prob -inf, after the real ones.
They are stored as they are in any version from 4 on: id -1 is no token, so it is never renumbered
(nor counted in the learned order), and the step into the first masked entry is the largest step
(65535), so it decodes 4096 nats below the last real entry: exp = 0 exactly, the tail and the top-k
mass stay as stored. The losses and collate recognise masked entries by their id.

**Schema version 5** adds one column (``FULL_SIGNAL_SCHEMA`` = ``SIGNAL_SCHEMA`` + it):

==============  ==========================  =====================================================
target_logprob  list<float32>               per target position: the teacher's raw log-prob of the
                                            token actually at ``input_ids[t]`` (sampled in generate
                                            mode, given in score mode), in the top k or not
==============  ==========================  =====================================================

On disk it is ``target_logprob_step`` list<uint16>: ``round((lp_0 - target) * scale)``, its offset
from the top-1 in the steps' own units, decoded against the decoded top-1. So it carries the same
bound as the top-k (within ``1 / scale`` nats of the engine's), and where the actual token is in the
top k it decodes to exactly the value stored for that entry. 65535 marks a missing value (NaN).
Offsets beyond 65534 steps (a log-prob of -inf) are clipped there.

**Schema version 6** stores the same column with the offset plus ``TARGET_STEP_BIAS`` (256 steps,
16 nats): ``round((lp_0 - target) * scale) + 256``. A single teacher's target is never above its
top-1, but a mixture's can be: ``target_logprob`` mixes every teacher's exact log-prob of the
token, while the stored top-k leaves out a teacher's mass on a token outside its own top k, so the
exact target can exceed the union's top-1 (by at most log of the number of teachers). Version 5
clipped such offsets at 0, decoding the target as the top-1 (0.16 nats low, seen in a two-teacher
run). Version 5 shards still read, with no bias (``target_step_bias``).

**Schema version 7** adds the coded layout (``CODED_STORED_SCHEMA``), which the teacher pass writes: the
directory's metadata holds ``signal_codec`` (``raydistill.data.entropy.SignalCodec``: static entropy models
learned from the first batch the pass's sink sees, ``teacher_pass.shard_rows`` rows), and each row's
``topk_ids``, ``topk_logprob_steps``, tail and ``target_logprob_step`` are coded together into one
``topk_coded`` binary value with asymmetric numeral systems. The ids are coded as themselves (no
``topk_id_order``), the steps and ``target_logprob_step`` as above, and the tail as its logit in
steps of 1/64 (``raydistill.data.entropy.TAIL_LOGIT_SCALE``: both the tail and the top-k mass to within
1/128 of themselves, so a decoded log-prob is within ``1 / scale`` + 1/128 nats of the engine's). Parquet's codecs spend ~12.5 bits on an id of
~11 bits of entropy and at least a bit on every step; the coded layout gets within a few percent of
the models' entropy (104 -> 87 B/token on Gemma 3 at k = 50, BENCHMARKS.md). Rows stay independent,
so Ray Data may split, slice and filter shards as before. A v7 directory without ``signal_codec``
(tests and tools that write signals by hand) has the Parquet layout of v6.

``SIGNAL_SCHEMA`` stays the columns every readable version has, and what the readers return by
default; ask for ``target_logprob`` by name (``load_signals(d, columns=[..., "target_logprob"])``).
Versions 2-4 do not store it: there the readers fill it from the top k where the actual token is
among them, and NaN where it is not (generate mode at temperature 1 samples outside the top k now
and then; score mode's given text does so more often). Only version 5 has it at every position.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 7
READABLE_SCHEMA_VERSIONS = (2, 3, 4, 5, 6, 7)
META_FILE = "_signals.json"
LOGPROB_SCALE = 8
PARQUET_COMPRESSION = "zstd"

SIGNAL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("target_start", pa.int32()),
        ("topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("prompt", pa.string()),
        ("response", pa.string()),
    ]
)
SIGNAL_COLUMNS = SIGNAL_SCHEMA.names
TARGET_LOGPROB_FIELD = pa.field("target_logprob", pa.list_(pa.float32()))
# What the teacher pass writes (v5): SIGNAL_SCHEMA plus the columns older versions lack.
FULL_SIGNAL_SCHEMA = pa.schema(list(SIGNAL_SCHEMA) + [TARGET_LOGPROB_FIELD])
FULL_SIGNAL_COLUMNS = FULL_SIGNAL_SCHEMA.names
# Optional row labels, plain strings stored as they are and read when asked for: ``domain`` (the row's
# ``data.domain_field``, whenever that is set) and ``teacher`` (which teacher wrote the row, with several
# teachers routed by domain).
# Rows that the adaptive loop's ``expand`` policy had the teacher write also carry ``parent_id`` (the
# training row the new prompt was written from) and ``round`` (the loop round that wrote it, an int32).
ROUTING_COLUMNS = ["teacher", "domain", "parent_id", "round"]
_LABEL_TYPES = {"round": pa.int32()}  # the other labels are strings
STORED_SCHEMA = pa.schema(
    [f for f in SIGNAL_SCHEMA if f.name != "topk_logprobs"]
    + [pa.field("tail_logprob", pa.list_(pa.float16())), pa.field("topk_logprob_steps", pa.list_(pa.list_(pa.uint16())))]
)
# Schema v7's coded layout: the top k, the tail and the target entropy coded into one value per row.
CODED_COLUMN = "topk_coded"
CODED_STORED_SCHEMA = pa.schema(
    [f for f in STORED_SCHEMA if f.name not in ("topk_ids", "topk_logprob_steps", "tail_logprob")] + [pa.field(CODED_COLUMN, pa.binary())]
)
STORED_TARGET_FIELD = pa.field("target_logprob_step", pa.list_(pa.uint16()))
FULL_STORED_SCHEMA = pa.schema(list(STORED_SCHEMA) + [STORED_TARGET_FIELD])
_TARGET_MISSING = np.iinfo(np.uint16).max
# v6: the target's offset is stored plus this many steps (16 nats at scale 16), so a target above the
# stored top-1 keeps its value (a mixture's; see the module docstring). v5 stored it with none.
TARGET_STEP_BIAS = 256


def target_step_bias(meta: dict) -> int:
    """The ``target_logprob_step`` bias of a signals directory with this metadata (0 before v6)."""
    return TARGET_STEP_BIAS if meta["schema_version"] >= 6 else 0


def _leaf_path(field: pa.Field) -> str:
    """A column's Parquet leaf path (``topk_ids.list.element.list.element``), as writer options name it."""
    path, t = field.name, field.type
    while pa.types.is_list(t):
        path, t = path + ".list.element", t.value_type
    return path


_TOPK_IDS_LEAF = _leaf_path(STORED_SCHEMA.field("topk_ids"))
# Writer options for signal shards (pyarrow.parquet / Ray Data write_parquet): the id codes are
# byte-plane split, not dictionary encoded (see the module docstring); every other column keeps
# Parquet's dictionary, which suits the steps (< 256 distinct values) and the ids and text.
PARQUET_WRITE_ARGS = {
    "compression": PARQUET_COMPRESSION,
    "use_dictionary": [_leaf_path(f) for f in FULL_STORED_SCHEMA if f.name != "topk_ids"],
    "column_encoding": {_TOPK_IDS_LEAF: "BYTE_STREAM_SPLIT"},
}
# The learned order lists at most this many ids (it lives in the JSON metadata); the rest of the
# vocabulary follows in id order.
ID_ORDER_MAX = 65536


def learn_id_order(topk_ids, max_ids: int = ID_ORDER_MAX) -> list[int]:
    """The ids in ``topk_ids`` (a signal table's ``topk_ids`` column, or an array of any shape), most
    frequent first (ties: smaller id first), at most ``max_ids``."""
    if isinstance(topk_ids, (pa.Array, pa.ChunkedArray)):
        topk_ids = _nested_values(topk_ids)[2]
    flat = np.asarray(topk_ids, dtype=np.int64).reshape(-1)
    ids, counts = np.unique(flat[flat >= 0], return_counts=True)  # masked entries (id -1) are no token
    order = np.argsort(-counts, kind="stable")  # np.unique sorts ids, so ties stay in id order
    return ids[order][:max_ids].tolist()


def ids_to_codes(ids: np.ndarray, id_order) -> np.ndarray:
    """Token ids -> codes: an id's place in ``id_order``, else len(id_order) + its rank among the ids not in it.

    A permutation of the non-negative integers, so any id round-trips, including ids the order
    has never seen. An empty order is the identity. Negative ids (masked entries) stay as they are.
    """
    ids = np.asarray(ids, dtype=np.int64)
    order = np.asarray(id_order, dtype=np.int64)
    if not len(order):
        return ids
    by_id = np.argsort(order)
    sorted_order = order[by_id]
    below = np.searchsorted(sorted_order, ids)  # how many listed ids are smaller than each id
    hit = sorted_order[np.minimum(below, len(order) - 1)] == ids
    return np.where(ids < 0, ids, np.where(hit, by_id[np.minimum(below, len(order) - 1)], len(order) + ids - below))


def codes_to_ids(codes: np.ndarray, id_order) -> np.ndarray:
    """The inverse of ``ids_to_codes``."""
    codes = np.asarray(codes, dtype=np.int64)
    order = np.asarray(id_order, dtype=np.int64)
    if not len(order):
        return codes
    sorted_order = np.sort(order)
    # The r-th unlisted id is r + (the number of listed ids below it); the listed id at sorted
    # place j has sorted_order[j] - j unlisted ids below it, which never decreases with j.
    r = codes - len(order)
    unlisted = r + np.searchsorted(sorted_order - np.arange(len(order)), r, side="right")
    return np.where(codes < 0, codes, np.where(codes < len(order), order[np.clip(codes, 0, len(order) - 1)], unlisted))


class SignalMismatchError(ValueError):
    """Signals that cannot be used with the given student (wrong tokenizer, unknown version)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary and the special-token ids.

    Two tokenizers with the same fingerprint map text to the same ids, so signals made with one
    are valid for a student using the other.
    """
    h = hashlib.sha256()
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        h.update(f"{name}={getattr(tokenizer, name, None)}\n".encode())
    return h.hexdigest()[:16]


def write_signal_meta(signals_dir: str | Path, meta: dict) -> None:
    """Write ``_signals.json`` atomically (a reader never sees half a file)."""
    from raydistill.fileio import write_atomic

    Path(signals_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(signals_dir) / META_FILE, json.dumps({**meta, "schema_version": SCHEMA_VERSION}, indent=2))


def update_signal_meta(signals_dir: str | Path, **fields) -> None:
    """Add or replace fields of an existing ``_signals.json`` (atomically, as ``write_signal_meta``)."""
    write_signal_meta(signals_dir, {**read_signal_meta(signals_dir), **fields})


def read_signal_meta(signals_dir: str | Path) -> dict:
    path = Path(signals_dir) / META_FILE
    if not path.exists():
        raise SignalMismatchError(f"{signals_dir}: no {META_FILE}; these are not raydistill teacher signals")
    meta = json.loads(path.read_text())
    if meta.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise SignalMismatchError(f"{path}: schema_version {meta.get('schema_version')} is not one of {READABLE_SCHEMA_VERSIONS}")
    return meta


def check_tokenizer_matches(signals_dir: str | Path, tokenizer, who: str = "student") -> dict:
    """Refuse signals made with a different tokenizer than ``tokenizer``'s: their ids would mean other tokens."""
    meta = read_signal_meta(signals_dir)
    fp = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer_fingerprint"] != fp:
        raise SignalMismatchError(
            f"signals in {signals_dir} were made with tokenizer {meta['tokenizer_fingerprint']}, "
            f"but the {who}'s tokenizer is {fp}; the {who} must use the teacher's tokenizer"
        )
    return meta


def _nested_values(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """list<list<x>> -> (outer offsets, inner offsets, flat values), each relative to the column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    outer = arr.offsets
    inner_arr = arr.values.slice(outer[0].as_py(), outer[-1].as_py() - outer[0].as_py())
    outer = pa.compute.subtract(outer, outer[0])
    inner = inner_arr.offsets
    values = inner_arr.values.slice(inner[0].as_py(), inner[-1].as_py() - inner[0].as_py()).to_numpy(zero_copy_only=False)
    inner = pa.compute.subtract(inner, inner[0])
    return outer, inner, values


def _map_nested(column, fn) -> pa.ListArray:
    """Apply ``fn`` to the flat values of a list<list<int32>> column, keeping its shape."""
    outer, inner, values = _nested_values(column)
    return pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(inner, pa.array(fn(values).astype(np.int32))))


def _quantized(table: pa.Table, scale: int, target_bias: int = TARGET_STEP_BIAS) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """A ``SIGNAL_SCHEMA`` table's log-probs as stored: (its row offsets, the log-probs [positions, k] as float64, the
    steps [positions, k - 1] as uint16, the log of the tail mass [positions], the target's steps [positions] as uint16,
    or None for a table without ``target_logprob``)."""
    outer, inner, lp = _nested_values(table["topk_logprobs"])
    lens = np.diff(inner.to_numpy())
    k = int(lens.max()) if len(lens) else 0
    if len(lens) and not (lens == k).all():
        raise ValueError("every position must hold the same number of top-k entries")
    lp = lp.astype(np.float64).reshape(-1, k) if k else np.zeros((0, 1))
    q = np.rint((lp[:, :1] - lp) * scale)
    with np.errstate(invalid="ignore"):
        # A masked entry (log-prob -inf, after the real ones) is an infinite step, clipped to the largest:
        # it decodes 4096 nats below the entry before it, exp = 0. Between two masked entries inf - inf is 0.
        steps = np.clip(np.nan_to_num(np.diff(q, axis=1), nan=0.0), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    with np.errstate(divide="ignore"):  # an empty tail is log(0) = -inf
        log_tail = np.log(np.clip(1.0 - np.exp(lp).sum(axis=1), 0.0, 1.0)) if k else np.zeros(0)
    target_steps = None
    if TARGET_LOGPROB_FIELD.name in table.column_names:
        target = _per_position(table[TARGET_LOGPROB_FIELD.name], outer)
        with np.errstate(invalid="ignore"):
            q_t = np.clip(np.rint((lp[:, 0] - target) * scale) + target_bias, 0, _TARGET_MISSING - 1) if k else np.zeros(0)
        target_steps = np.where(np.isnan(q_t), _TARGET_MISSING, q_t).astype(np.uint16)
    return outer, lp, steps, log_tail, target_steps


def learn_signal_codec(table: pa.Table, scale: int = LOGPROB_SCALE, target_bias: int = TARGET_STEP_BIAS):
    """The entropy models of the coded layout (``raydistill.data.entropy``), learned from a ``SIGNAL_SCHEMA`` table."""
    from raydistill.data.entropy import learn_codec

    _, lp, steps, log_tail, target_steps = _quantized(table, scale, target_bias)
    ids = _nested_values(table["topk_ids"])[2].astype(np.int64).reshape(len(lp), -1)
    return learn_codec(ids, steps, log_tail, np.zeros(0, np.uint16) if target_steps is None else target_steps)


def signal_codec(meta: dict):
    """The ``SignalCodec`` of a signals directory with this metadata, or None (the Parquet layout: v2-v6, and v7 without one)."""
    from raydistill.data.entropy import SignalCodec

    return SignalCodec.from_json(meta["signal_codec"]) if meta.get("signal_codec") else None


def encode_signals(table: pa.Table, scale: int = LOGPROB_SCALE, id_order=(), target_bias: int = TARGET_STEP_BIAS, codec=None) -> pa.Table:
    """``SIGNAL_SCHEMA`` table -> ``STORED_SCHEMA`` table (the on-disk form); ``id_order`` as in the metadata,
    ``target_bias`` the directory's ``target_step_bias`` (rows added to an older directory use its own).
    ``codec``: the directory's ``SignalCodec``; the ids, steps, tail and target are then entropy coded into
    ``topk_coded`` (``CODED_STORED_SCHEMA``) and ``id_order`` is not used."""
    outer, lp, steps, log_tail, target_steps = _quantized(table, scale, target_bias)
    n_pos, k = lp.shape[0], (lp.shape[1] if len(lp) else 0)
    drop = ["topk_logprobs"] + ([TARGET_LOGPROB_FIELD.name] if TARGET_LOGPROB_FIELD.name in table.column_names else [])
    stored = table.drop_columns(drop)
    if codec is not None:
        from raydistill.data.entropy import encode_rows

        ids = _nested_values(stored["topk_ids"])[2].astype(np.int64).reshape(n_pos, -1) if n_pos else np.zeros((0, k), np.int64)
        blobs = encode_rows(ids, steps, log_tail, target_steps, np.diff(outer.to_numpy()), codec)
        stored = stored.drop_columns(["topk_ids"]).append_column(CODED_COLUMN, pa.array(blobs, pa.binary()))
        schema = CODED_STORED_SCHEMA
    else:
        if len(id_order):
            stored = stored.set_column(stored.schema.get_field_index("topk_ids"), "topk_ids", _map_nested(stored["topk_ids"], lambda v: ids_to_codes(v, id_order)))
        step_lists = pa.ListArray.from_arrays(pa.array(np.arange(n_pos + 1, dtype=np.int32) * max(k - 1, 0)), pa.array(steps.reshape(-1)))
        # float16 holds the -inf of an empty tail
        stored = stored.append_column("tail_logprob", pa.ListArray.from_arrays(outer, pa.array(log_tail.astype(np.float16))))
        stored = stored.append_column("topk_logprob_steps", pa.ListArray.from_arrays(outer, step_lists))
        if target_steps is not None:
            stored = stored.append_column(STORED_TARGET_FIELD.name, pa.ListArray.from_arrays(outer, pa.array(target_steps)))
        schema = FULL_STORED_SCHEMA if target_steps is not None else STORED_SCHEMA
    routing = [c for c in ROUTING_COLUMNS if c in stored.column_names]
    return stored.select(schema.names + routing).cast(pa.schema(list(schema) + [pa.field(c, _LABEL_TYPES.get(c, pa.string())) for c in routing]))


def _per_position(column, outer: pa.Array) -> np.ndarray:
    """A list<float> column -> float64 values aligned with ``outer`` (the top-k's row offsets); NaN where a
    row's list is null or does not have one value per position (a table built without the column)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    want = np.diff(outer.to_numpy())
    out = np.full(int(want.sum()), np.nan)
    if not len(arr):
        return out
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.float64)
    valid = arr.is_valid().to_numpy(zero_copy_only=False) & (np.diff(offsets) == want)
    dst = np.concatenate([[0], np.cumsum(want)])
    for r in np.flatnonzero(valid):  # per row, not per position
        out[dst[r]:dst[r + 1]] = values[offsets[r]:offsets[r + 1]]
    return out


def decode_signals(table: pa.Table, scale: int = LOGPROB_SCALE, id_order=(), target_bias: int = TARGET_STEP_BIAS, codec=None) -> pa.Table:
    """``STORED_SCHEMA`` or ``CODED_STORED_SCHEMA`` table (or a column subset) -> ``SIGNAL_SCHEMA`` columns; the readers'
    inverse of ``encode_signals``. ``codec``: the directory's ``SignalCodec``, for tables with ``topk_coded``."""
    if CODED_COLUMN in table.column_names:
        table = _uncoded(table, codec)
    elif len(id_order) and "topk_ids" in table.column_names:
        table = table.set_column(table.schema.get_field_index("topk_ids"), "topk_ids", _map_nested(table["topk_ids"], lambda v: codes_to_ids(v, id_order)))
    if "topk_logprob_steps" not in table.column_names:
        return table
    outer, _, steps = _nested_values(table["topk_logprob_steps"])
    anchor = "tail_logprob" if "tail_logprob" in table.column_names else "top1_logprob"  # v3+ or v2
    per_pos = pa.chunked_array(table[anchor]).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    n_pos = len(per_pos)
    k = (len(steps) // n_pos + 1) if n_pos else 1
    rel = -np.concatenate([np.zeros((n_pos, 1)), np.cumsum(steps.reshape(n_pos, k - 1).astype(np.float64), axis=1)], axis=1) / scale
    if anchor == "tail_logprob":
        # One shift per position so the top-k sums to 1 - tail (see the module docstring).
        top_mass = np.maximum(-np.expm1(per_pos), np.finfo(np.float64).tiny)
        lp = rel + (np.log(top_mass) - np.log(np.exp(rel).sum(axis=1)))[:, None]
    else:
        lp = per_pos[:, None] + rel
    lists = pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(pa.array(np.arange(n_pos + 1, dtype=np.int32) * k), pa.array(lp.astype(np.float32).reshape(-1))))
    out = table.drop_columns([anchor, "topk_logprob_steps"]).append_column("topk_logprobs", lists)
    if STORED_TARGET_FIELD.name in out.column_names:
        q_t = _nested_single(out[STORED_TARGET_FIELD.name]).astype(np.float64)
        target = np.where(q_t == _TARGET_MISSING, np.nan, lp[:, 0] - (q_t - target_bias) / scale) if n_pos else np.zeros(0)
        out = out.drop_columns([STORED_TARGET_FIELD.name]).append_column(TARGET_LOGPROB_FIELD.name, pa.ListArray.from_arrays(outer, pa.array(target.astype(np.float32))))
    return out.select([c for c in FULL_SIGNAL_COLUMNS + ROUTING_COLUMNS if c in out.column_names])


def _uncoded(table: pa.Table, codec) -> pa.Table:
    """``topk_coded`` -> the Parquet layout's columns (``topk_ids``, ``tail_logprob``, ``topk_logprob_steps`` and, where
    the rows were coded with targets, ``target_logprob_step``), which ``decode_signals`` then decodes as before."""
    from raydistill.data.entropy import decode_rows

    if codec is None:
        raise SignalMismatchError(f"these signal shards are entropy coded ({CODED_COLUMN}) but their metadata has no signal_codec")
    rows = decode_rows(table[CODED_COLUMN].combine_chunks().to_pylist() if table.num_rows else [], codec)
    outer = pa.array(np.concatenate([[0], np.cumsum(rows.positions)]).astype(np.int32))
    n_pos = len(rows.ids)

    def nested(values: np.ndarray, width: int) -> pa.ListArray:
        return pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(pa.array(np.arange(n_pos + 1, dtype=np.int32) * width), pa.array(values.reshape(-1))))

    out = table.drop_columns([CODED_COLUMN]).append_column("topk_ids", nested(rows.ids.astype(np.int32), rows.k))
    out = out.append_column("tail_logprob", pa.ListArray.from_arrays(outer, pa.array(rows.log_tail)))
    out = out.append_column("topk_logprob_steps", nested(rows.steps, max(rows.k - 1, 0)))
    if rows.target_steps is not None:
        out = out.append_column(STORED_TARGET_FIELD.name, pa.ListArray.from_arrays(outer, pa.array(rows.target_steps)))
    return out


def _nested_single(column) -> np.ndarray:
    """The flat values of a list<x> column (offsets rebased, as Ray's slices need)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    off = arr.offsets
    return arr.values.slice(off[0].as_py(), off[-1].as_py() - off[0].as_py()).to_numpy(zero_copy_only=False)


def target_logprob_from_topk(table: pa.Table) -> pa.ListArray:
    """Schema versions 2-4, which do not store ``target_logprob``: the actual token's log-prob where it
    is in the top k, NaN where it is not. Needs ``input_ids``, ``target_start``, ``topk_ids``, ``topk_logprobs``."""
    outer, _, ids = _nested_values(table["topk_ids"])
    _, _, lps = _nested_values(table["topk_logprobs"])
    counts = np.diff(outer.to_numpy())
    n_pos = int(counts.sum())
    if not n_pos:
        return pa.ListArray.from_arrays(outer, pa.array(np.zeros(0, np.float32)))
    k = len(ids) // n_pos
    in_ids = table["input_ids"].combine_chunks()
    in_off = in_ids.offsets.to_numpy()
    flat = _nested_single(in_ids)
    starts = table["target_start"].to_numpy().astype(np.int64)
    # Position j of row r is the token at input_ids[r][target_start[r] + j].
    first = np.repeat(in_off[:-1] - in_off[0] + starts, counts)
    j = np.arange(n_pos) - np.repeat(np.cumsum(counts) - counts, counts)
    actual = flat[first + j]
    hit = ids.reshape(n_pos, k) == actual[:, None]
    picked = np.where(hit.any(axis=1), lps.reshape(n_pos, k)[np.arange(n_pos), hit.argmax(axis=1)], np.nan)
    return pa.ListArray.from_arrays(outer, pa.array(picked.astype(np.float32)))


def _stored_columns(columns: list[str], schema_version: int, stored_target: bool, coded: bool = False) -> list[str]:
    """The stored columns that decode to ``columns``. ``stored_target``: the shards hold ``target_logprob_step``
    (else ``target_logprob`` is filled from the top k, which needs the ids and the top k). ``coded``: the shards
    hold ``topk_coded`` in place of the ids and steps (v7 with a ``signal_codec``). ``ROUTING_COLUMNS`` are
    stored as they are."""
    wanted = set(columns)
    if TARGET_LOGPROB_FIELD.name in wanted:
        wanted |= {"topk_logprobs"} | (set() if stored_target else {"input_ids", "target_start", "topk_ids"})
    out = [c for c in STORED_SCHEMA.names if c in wanted]
    anchor = "top1_logprob" if schema_version == 2 else "tail_logprob"
    if "topk_logprobs" in wanted:
        out = [c for c in out if c not in (anchor, "topk_logprob_steps")] + [anchor, "topk_logprob_steps"]
    if TARGET_LOGPROB_FIELD.name in wanted and stored_target:
        out.append(STORED_TARGET_FIELD.name)
    if coded:
        plain = [c for c in out if c not in ("topk_ids", "topk_logprob_steps", "tail_logprob", STORED_TARGET_FIELD.name)]
        out = plain + [CODED_COLUMN] if len(plain) < len(out) else out
    return out + [c for c in ROUTING_COLUMNS if c in wanted]


def _decode_columns(table: pa.Table, columns: list[str], meta: dict) -> pa.Table:
    """Decode a table read with ``_stored_columns(columns, ...)`` and return exactly ``columns`` (in schema order)."""
    out = decode_signals(table, meta["logprob_scale"], meta.get("topk_id_order", ()), target_step_bias(meta), signal_codec(meta))
    if TARGET_LOGPROB_FIELD.name in columns and TARGET_LOGPROB_FIELD.name not in out.column_names:
        out = out.append_column(TARGET_LOGPROB_FIELD.name, target_logprob_from_topk(out))
    return out.select([c for c in FULL_SIGNAL_COLUMNS + ROUTING_COLUMNS if c in columns])


def shard_files(signals_dir: str | Path) -> list[str]:
    """The teacher pass's shards: the Parquet files directly in ``signals_dir``.

    Subdirectories are not signals of this pass (``on_policy/`` holds the student's rollouts, in
    their own schema), so readers list the top level instead of letting Arrow or Ray recurse.
    """
    files = sorted(str(f) for f in Path(signals_dir).glob("*.parquet") if f.is_file())
    if not files:
        raise SignalMismatchError(f"{signals_dir}: no signal shards (*.parquet); run the teacher pass first")
    return files


def load_signals(signals_dir: str | Path, columns: list[str] | None = None, files: list[str] | None = None, ids=None) -> pa.Table:
    """All signal rows of ``signals_dir`` as one decoded table (small runs, tests, reports): ``SIGNAL_SCHEMA``,
    or ``columns`` of ``FULL_SIGNAL_SCHEMA`` (``target_logprob`` only when asked for). ``files``: only these
    shards; ``ids``: only the rows with these ids (read with a filter, so one shard's worth of rows at a time)."""
    import pyarrow.dataset as pads

    meta = read_signal_meta(signals_dir)
    columns = list(SIGNAL_COLUMNS) if columns is None else list(columns)
    ds = pads.dataset(files or shard_files(signals_dir), format="parquet")
    coded = CODED_COLUMN in ds.schema.names
    wanted = _stored_columns(columns, meta["schema_version"], coded or STORED_TARGET_FIELD.name in ds.schema.names, coded)
    table = ds.to_table(columns=wanted, filter=None if ids is None else pads.field("id").isin(pa.array(list(ids.to_pylist() if hasattr(ids, "to_pylist") else ids), pa.string())))
    return _decode_columns(table, columns, meta)


def read_signals(signals_dir: str | Path, split: str | None = None, extra_columns: tuple[str, ...] = ()):
    """A lazy Ray Dataset of decoded signal rows, optionally only one split; ``extra_columns``: ``ROUTING_COLUMNS`` to add."""
    import ray.data

    meta = read_signal_meta(signals_dir)
    unknown = [c for c in extra_columns if c not in ROUTING_COLUMNS]
    if unknown:
        raise ValueError(f"extra_columns: {unknown} are not among {ROUTING_COLUMNS}")
    # The SIGNAL_SCHEMA columns, as before v5: training reads no target_logprob.
    codec = signal_codec(meta)
    ds = ray.data.read_parquet(shard_files(signals_dir), columns=_stored_columns(list(SIGNAL_COLUMNS) + list(extra_columns), meta["schema_version"], False, codec is not None))
    if split is not None:
        ds = ds.filter(expr=f"split == '{split}'")
    return ds.map_batches(decode_signals, fn_kwargs={"scale": meta["logprob_scale"], "id_order": meta.get("topk_id_order", ()), "target_bias": target_step_bias(meta),
                                                     "codec": codec}, batch_format="pyarrow")


def stable_split(example_id: str, eval_fraction: float) -> str:
    """'eval' for a stable ``eval_fraction`` share of ids, else 'train'."""
    bucket = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"
