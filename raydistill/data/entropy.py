"""Entropy coding of teacher signals: schema v7's ``topk_coded``, one value per row.

Parquet's column codecs cannot get close to what these columns hold. The ids come from a 262k-token
vocabulary (Gemma 3) with a very skewed use: byte planes plus zstd spend ~12.5 bits on an id whose
entropy is ~11 bits, and the Huffman stage of zstd spends at least one bit on every log-prob step,
where most steps at the low ranks carry a fraction of a bit (BENCHMARKS.md, "Gemma storage with
schema v7's coded layout"). So each row's ids, steps, tail and target are coded as one stream with
asymmetric numeral systems, using ``constriction``'s coder (Rust) and static models learned once per
signals directory.

The models (``SignalCodec``), learned from the first shard's worth of rows (``learn_codec``):

* **ids**: every id seen, with its count, most frequent first, plus one escape symbol for any other
  id, with the Good-Turing mass (the number of ids seen once). An escaped id is coded as the bit
  length ``L`` of ``id + 1`` (a model of the lengths of the ids seen, smoothed over all 64 lengths)
  and then its ``L - 1`` bits below the leading one, uniformly. So any id round-trips, including ids
  the model never saw and the masked entries (-1) of several teachers' mixtures (``L = 0``).
* **steps** (``topk_logprob_steps``, see ``raydistill.data.signals``): one model per octave of rank
  (the step into rank 1, ranks 2-3, 4-7, ...), over 0..254 plus an escape; an escaped step is
  coded uniformly in 16 bits (masked entries' 65535 and rare large gaps).
* **tail**: its logit, quantized (``tail_symbols``); **target** (``target_logprob_step``): 0..1022
  plus an escape to 16 bits (65535 = no target at that position).

A row's value (``encode_rows``): one header word (has targets << 31 | positions << 12 | k), then the
ANS words. Decoding reads, in order: the P x k id symbols, the escaped ids' lengths and bits, each
rank octave's steps, the escaped steps, the tails, the targets and their escapes. Rows are
independent, so Ray Data can split, slice and filter shards as it likes.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

STEP_ALPHABET = 256  # steps 0..254, and 255 = escape
_STEP_ESCAPE = STEP_ALPHABET - 1
_LENGTHS = 64  # bit lengths of id + 1 for escaped ids
# The tail's logit log(t / (1 - t)) in steps of 1/64, clipped to +-64: relative errors of at most 1/128 in both
# the tail and the top-k mass 1 - t (so the decoded log-probs move by at most t / 128 nats with it), and a
# tail of 0 (the top k hold everything) is stored as e^-64. Each halving of the step costs ~1 bit per position.
TAIL_LOGIT_SCALE = 64
_TAIL_LIMIT = 64 * TAIL_LOGIT_SCALE
TARGET_ALPHABET = 1024  # target steps 0..1022, and 1023 = escape (the value follows in 16 bits)
_MAX_K = (1 << 12) - 1
_MAX_POSITIONS = (1 << 19) - 1


def tail_symbols(log_tail: np.ndarray) -> np.ndarray:
    """log of the tail mass -> the coded symbol 0 .. 2 * 64 * TAIL_LOGIT_SCALE (the logit, quantized and shifted)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = np.asarray(log_tail, np.float64) - np.log(-np.expm1(np.asarray(log_tail, np.float64)))
    logit = np.clip(np.where(np.isnan(logit), -np.inf, logit), -_TAIL_LIMIT / TAIL_LOGIT_SCALE, _TAIL_LIMIT / TAIL_LOGIT_SCALE)
    return (np.rint(logit * TAIL_LOGIT_SCALE) + _TAIL_LIMIT).astype(np.int64)


def tail_from_symbols(sym: np.ndarray) -> np.ndarray:
    """The inverse of ``tail_symbols``, up to its rounding: the log of the tail mass."""
    logit = (np.asarray(sym, np.float64) - _TAIL_LIMIT) / TAIL_LOGIT_SCALE
    return -np.logaddexp(0.0, -logit)  # log sigmoid


@dataclass(frozen=True)
class SignalCodec:
    """Static entropy models for one signals directory (stored in its metadata as ``signal_codec``)."""

    ids: np.ndarray  # int64 [n]: the ids with a learned probability, most frequent first
    id_counts: np.ndarray  # int64 [n + 1]: their counts, then the escape's
    length_counts: np.ndarray  # int64 [64]: bit lengths of id + 1 among the ids seen
    step_counts: np.ndarray  # int64 [octaves, 256]: per rank octave, counts of steps 0..254, then escapes
    tail_counts: np.ndarray  # int64 [2 * 64 * 64 + 1]: counts of the tail's quantized logit (``tail_symbols``)
    target_counts: np.ndarray  # int64 [1024]: counts of the target's step (``target_logprob_step``) 0..1022, then escapes

    def to_json(self) -> dict:
        return {"ids": self.ids.tolist(), "id_counts": self.id_counts.tolist(), "length_counts": self.length_counts.tolist(),
                "step_counts": self.step_counts.tolist(), "tail_counts": self.tail_counts.tolist(), "target_counts": self.target_counts.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "SignalCodec":
        return cls(np.asarray(d["ids"], np.int64), np.asarray(d["id_counts"], np.int64), np.asarray(d["length_counts"], np.int64),
                   np.asarray(d["step_counts"], np.int64).reshape(-1, STEP_ALPHABET), np.asarray(d["tail_counts"], np.int64),
                   np.asarray(d["target_counts"], np.int64))

    @functools.cached_property
    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.ids, self.id_counts, self.length_counts, self.step_counts, self.tail_counts, self.target_counts):
            h.update(np.ascontiguousarray(a, np.int64).tobytes() + b"|")
        return h.hexdigest()[:16]


def _octave(k: int) -> np.ndarray:
    """The rank octave of each step j = 1..k-1 (the step into rank j): 0 for j = 1, 1 for 2-3, 2 for 4-7, ..."""
    return np.floor(np.log2(np.arange(1, max(k, 1)))).astype(np.int64) if k > 1 else np.zeros(0, np.int64)


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Bit lengths of non-negative int64 values (0 -> 0)."""
    out = np.zeros(v.shape, np.int64)
    v = v.copy()
    while (v > 0).any():
        out += v > 0
        v >>= 1
    return out


def learn_codec(ids: np.ndarray, steps: np.ndarray, log_tail: np.ndarray, target_steps: np.ndarray) -> SignalCodec:
    """Models from ``ids`` [positions, k] (token ids; -1 = masked, not counted), ``steps`` [positions, k - 1], the log of
    the tail mass [positions] and the target's steps [positions] (uint16, 65535 = none; empty for a table without)."""
    ids = np.asarray(ids, np.int64)
    flat = ids.reshape(-1)
    seen, counts = np.unique(flat[flat >= 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    seen, counts = seen[order], counts[order]
    escape = max(1, int((counts == 1).sum()))  # Good-Turing: the mass of ids not seen yet
    lengths = np.bincount(_bit_length(seen + 1), minlength=_LENGTHS)[:_LENGTHS]
    steps = np.asarray(steps, np.int64)
    k = ids.shape[1] if ids.ndim == 2 else 1
    octaves = int(_octave(k).max()) + 1 if k > 1 else 1
    step_counts = np.zeros((max(octaves, 1), STEP_ALPHABET), np.int64)
    if steps.size:
        sym = np.minimum(steps, _STEP_ESCAPE)
        for o in range(octaves):
            step_counts[o] = np.bincount(sym[:, _octave(k) == o].reshape(-1), minlength=STEP_ALPHABET)
    tail_counts = np.bincount(tail_symbols(log_tail), minlength=2 * _TAIL_LIMIT + 1)
    target_counts = np.bincount(np.minimum(np.asarray(target_steps, np.int64), TARGET_ALPHABET - 1), minlength=TARGET_ALPHABET)
    return SignalCodec(seen, np.concatenate([counts, [escape]]), lengths, step_counts, tail_counts, target_counts)


class _Models:
    """constriction's models for a codec, built once per process (a 24k-symbol table takes milliseconds)."""

    def __init__(self, codec: SignalCodec):
        import constriction

        m = constriction.stream.model
        self.codec = codec
        self.sorter = np.argsort(codec.ids, kind="stable")
        self.sorted_ids = codec.ids[self.sorter]
        self.ids = m.Categorical(codec.id_counts.astype(np.float64), perfect=False)
        # Smoothed, so that any length and any step value can be coded, however rare.
        self.lengths = m.Categorical(codec.length_counts.astype(np.float64) + 1.0, perfect=False)
        self.steps = [m.Categorical(c.astype(np.float64) + 0.5, perfect=False) for c in codec.step_counts]
        self.tail = m.Categorical(codec.tail_counts.astype(np.float64) + 0.5, perfect=False)
        self.target = m.Categorical(codec.target_counts.astype(np.float64) + 0.5, perfect=False)
        self.uniform = m.Uniform()
        self.u16 = m.Uniform(1 << 16)

    def step_model(self, octave: int):
        return self.steps[min(octave, len(self.steps) - 1)]


_MODELS: dict[str, _Models] = {}


def models(codec: SignalCodec) -> _Models:
    """The models of ``codec``, from a per-process cache (by content, so every copy of a codec shares them)."""
    built = _MODELS.get(codec.digest)
    if built is None:
        if len(_MODELS) >= 8:
            _MODELS.pop(next(iter(_MODELS)))
        built = _MODELS[codec.digest] = _Models(codec)
    return built


def _escape_payload(values: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Escaped ids -> (bit lengths L of id + 1, [(symbols, sizes)] for the bits below the leading one, low 16 then the rest)."""
    v = values.astype(np.int64) + 1
    lengths = _bit_length(v)
    nbits = np.maximum(lengths - 1, 0)
    rest = v - np.where(lengths > 0, np.left_shift(1, nbits), 0)
    lo_bits, hi_bits = np.minimum(nbits, 16), np.maximum(nbits - 16, 0)
    parts = []
    for bits, vals in ((lo_bits, rest & 0xFFFF), (hi_bits, rest >> 16)):
        keep = bits > 0  # constriction's uniform model needs two symbols at least; no bits, nothing to code
        parts.append((vals[keep].astype(np.int32), np.left_shift(1, bits[keep]).astype(np.int32)))
    return lengths, parts


def _escaped(values: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray]:
    """Values -> (symbols, with alphabet - 1 for every value from there up; those values, in order)."""
    values = np.asarray(values, np.int64).reshape(-1)
    return np.minimum(values, alphabet - 1).astype(np.int32), values[values >= alphabet - 1].astype(np.int32)


def encode_rows(ids: np.ndarray, steps: np.ndarray, log_tail: np.ndarray, target_steps: np.ndarray | None,
                row_positions: np.ndarray, codec: SignalCodec) -> list[bytes]:
    """Rows back to back -> one byte string per row: ``ids`` [positions, k], ``steps`` [positions, k - 1] (uint16),
    ``log_tail`` [positions], ``target_steps`` [positions] (uint16, 65535 = none) or None for a table without targets."""
    import constriction

    ms = models(codec)
    ids = np.asarray(ids, np.int64)
    k = ids.shape[1] if ids.ndim == 2 else 0
    row_positions = np.asarray(row_positions, np.int64)
    if k > _MAX_K:
        raise ValueError(f"top-k width {k} is over the coded layout's {_MAX_K}")
    if len(row_positions) and int(row_positions.max()) > _MAX_POSITIONS:
        raise ValueError(f"a row has {int(row_positions.max())} target positions, over the coded layout's {_MAX_POSITIONS}")
    n_sym = len(ms.sorted_ids)
    at = np.minimum(np.searchsorted(ms.sorted_ids, ids), max(n_sym - 1, 0))
    hit = (ms.sorted_ids[at] == ids) if n_sym else np.zeros(ids.shape, bool)
    sym = np.where(hit, ms.sorter[at] if n_sym else 0, n_sym).astype(np.int32)
    steps = np.asarray(steps, np.int64).reshape(len(ids), max(k - 1, 0))
    tails = tail_symbols(log_tail).astype(np.int32)
    octave = _octave(k)
    ends = np.cumsum(row_positions)
    out = []
    for start, end in zip(ends - row_positions, ends):
        coder = constriction.stream.stack.AnsCoder()
        # A stack: pushed in the reverse of the order decode_rows reads.
        if target_steps is not None and end > start:
            t_sym, t_big = _escaped(target_steps[start:end], TARGET_ALPHABET)
            if len(t_big):
                coder.encode_reverse(t_big, ms.u16)
            coder.encode_reverse(t_sym, ms.target)
        if end > start:
            coder.encode_reverse(tails[start:end], ms.tail)
        s = steps[start:end]
        _, s_big = _escaped(s, STEP_ALPHABET)
        if len(s_big):
            coder.encode_reverse(s_big, ms.u16)
        for o in range(int(octave.max()) if k > 1 else -1, -1, -1):
            if end > start:
                coder.encode_reverse(_escaped(s[:, octave == o], STEP_ALPHABET)[0], ms.step_model(o))
        row_ids, row_sym = ids[start:end].reshape(-1), sym[start:end].reshape(-1)
        escaped = row_ids[row_sym == n_sym]
        if len(escaped):
            lengths, parts = _escape_payload(escaped)
            for vals, sizes in reversed(parts):
                if len(vals):
                    coder.encode_reverse(vals, ms.uniform, sizes)
            coder.encode_reverse(lengths.astype(np.int32), ms.lengths)
        if len(row_sym):
            coder.encode_reverse(row_sym, ms.ids)
        header = np.array([(int(target_steps is not None) << 31) | (int(end - start) << 12) | k], np.uint32)
        out.append(np.concatenate([header, coder.get_compressed()]).astype("<u4").tobytes())
    return out


@dataclass
class DecodedRows:
    """``decode_rows``' result, rows back to back."""

    ids: np.ndarray  # int64 [positions, k]
    steps: np.ndarray  # uint16 [positions, k - 1]
    log_tail: np.ndarray  # float64 [positions]
    target_steps: np.ndarray | None  # uint16 [positions], or None where the rows were coded without targets
    positions: np.ndarray  # int64 [rows]
    k: int


def decode_rows(blobs, codec: SignalCodec) -> DecodedRows:
    """The inverse of ``encode_rows`` (the tail up to its rounding). Every row must have the same k and all or none of
    them targets, as ``encode_signals`` writes a table's rows."""
    import constriction

    ms = models(codec)
    n_sym = len(codec.ids)
    ids_, steps_, tails_, targets_, positions, width, with_target = [], [], [], [], [], None, None
    for blob in blobs:
        words = np.frombuffer(blob, "<u4")
        head = int(words[0])
        p, k, has_target = (head >> 12) & _MAX_POSITIONS, head & _MAX_K, bool(head >> 31)
        if width is None:
            width, with_target = k, has_target
        elif (k != width and p) or has_target != with_target:
            raise ValueError(f"rows of one batch were coded differently (k {width} and {k}, targets {with_target} and {has_target})")
        coder = constriction.stream.stack.AnsCoder(words[1:].astype(np.uint32))
        sym = coder.decode(ms.ids, p * k).astype(np.int64) if p * k else np.zeros(0, np.int64)
        ids = codec.ids[np.minimum(sym, n_sym - 1)] if n_sym else np.zeros(len(sym), np.int64)
        esc = sym == n_sym
        if esc.any():
            lengths = coder.decode(ms.lengths, int(esc.sum())).astype(np.int64)
            nbits = np.maximum(lengths - 1, 0)
            rest = np.zeros(len(lengths), np.int64)
            for shift, bits in ((0, np.minimum(nbits, 16)), (16, np.maximum(nbits - 16, 0))):
                keep = bits > 0
                if keep.any():
                    rest[keep] |= coder.decode(ms.uniform, np.left_shift(1, bits[keep]).astype(np.int32)).astype(np.int64) << shift
            ids[esc] = np.where(lengths > 0, np.left_shift(1, nbits) + rest, 0) - 1
        octave = _octave(k)
        steps = np.zeros((p, max(k - 1, 0)), np.int64)
        if p:
            for o in range(int(octave.max()) + 1 if k > 1 else 0):
                cols = octave == o
                steps[:, cols] = coder.decode(ms.step_model(o), p * int(cols.sum())).reshape(p, -1)
        big = steps == _STEP_ESCAPE
        if big.any():
            steps[big] = coder.decode(ms.u16, int(big.sum()))
        tails = coder.decode(ms.tail, p) if p else np.zeros(0, np.int64)
        if has_target:
            target = coder.decode(ms.target, p).astype(np.int64) if p else np.zeros(0, np.int64)
            big = target == TARGET_ALPHABET - 1
            if big.any():
                target[big] = coder.decode(ms.u16, int(big.sum()))
            targets_.append(target)
        ids_.append(ids.reshape(p, k))
        steps_.append(steps)
        tails_.append(tails)
        positions.append(p)
    k, n = width or 0, int(sum(positions))

    def cat(parts, shape, dtype):
        return np.concatenate(parts).reshape(shape).astype(dtype) if parts else np.zeros(shape, dtype)

    return DecodedRows(cat(ids_, (n, k), np.int64), cat(steps_, (n, max(k - 1, 0)), np.uint16),
                       tail_from_symbols(cat(tails_, (n,), np.int64)), cat(targets_, (n,), np.uint16) if with_target else None,
                       np.asarray(positions, np.int64), k)
