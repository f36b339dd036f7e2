"""vLLM's log-probs -> signal columns as numpy and Arrow arrays, with no Python object per (position, candidate).

With ``SamplingParams(flat_logprobs=True)`` (vllm 0.32) a request's log-probs come back as
``vllm.logprobs.FlatLogprobs``: parallel flat lists ``token_ids`` / ``logprobs`` / ``ranks``, position
``i`` at ``[start_indices[i], end_indices[i])``. vLLM fills every position the same way
(``vllm.logprobs.append_logprobs_for_next_position``): the actual token first (the sampled one in
generate mode, the given one in prompt log-probs) with its vocabulary rank, then the top k with
ranks 1..k. So a position holds k + 1 entries, the actual token twice when it is in the top k, and
``prompt_logprobs`` position 0 (no prediction for the first token) holds none.

``topk_from_flat`` gives exactly what the dict path gives (``raydistill.teacher.stage.topk_from_logprob_dict``
over vLLM's ``{token_id: Logprob}`` dicts): the dict drops the duplicate, keeps the first insertion
slot, and a stable sort by rank takes the first k. vLLM ranks the actual token by ``logprob >=``
(``vllm.v1.sample.ops.logprobs.batched_count_greater_than``), so when it is not in the top k its rank
is above k and the top k stand as they are: columns 1..k, one reshape. Any position that does not have
that shape (a different vLLM, NaN log-probs) goes through the dict path itself, so the output matches
it; tests/unit/test_teacher_arrays.py checks both, and tests/unit/test_teacher_ray_contract.py pins
how vLLM fills the lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class TopK:
    """The top k of P positions."""

    ids: np.ndarray  # [P, k] int32, most likely first
    logprobs: np.ndarray  # [P, k] float32
    target: np.ndarray  # [P] float32: the log-prob of the actual token at each position (top k or not)


@dataclass(frozen=True)
class RowSignal:
    """One signal row's per-token arrays (a completion of a request)."""

    input_ids: np.ndarray  # [T] int32
    target_start: int
    topk: TopK
    response: str


def _empty(k: int) -> TopK:
    return TopK(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32))


def topk_from_flat(flat: Any, k: int, first: int = 0) -> TopK:
    """Positions ``first..`` of a ``FlatLogprobs`` -> their top k, as the dict path would keep them."""
    if not hasattr(flat, "start_indices"):  # list[dict[int, Logprob]]: flat_logprobs was not honoured
        return _topk_via_dicts(flat, k, first)
    starts, ends = flat.start_indices, flat.end_indices
    n_pos = len(starts) - first
    if n_pos <= 0:
        return _empty(k)
    width = k + 1
    lo, hi = starts[first], ends[-1]
    uniform = hi - lo == n_pos * width and all(e - s == width for s, e in zip(starts[first:], ends[first:]))
    if not uniform:
        return _topk_via_dicts(flat, k, first)
    tok = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(n_pos, width)
    lp = np.asarray(flat.logprobs[lo:hi], dtype=np.float64).reshape(n_pos, width)
    # Only the actual token's rank is read: vLLM writes ranks 1..k for the top k by construction
    # (tests/unit/test_teacher_ray_contract.py pins that), so converting them would be per-entry work for nothing.
    actual_rank = np.asarray(flat.ranks[lo:hi:width], dtype=np.float64)  # float: a None rank becomes NaN
    in_top = (tok[:, 1:] == tok[:, :1]).any(axis=1)
    # Where the dict path would order differently from columns 1..k: an actual token outside the top k
    # that ranks within it. vllm 0.32 ranks by ">=", so that takes a NaN or another vLLM.
    odd = ~in_top & ~(actual_rank > k)
    ids, lps = tok[:, 1:].astype(np.int32), lp[:, 1:].astype(np.float32)
    for p in np.flatnonzero(odd):
        ids[p], lps[p] = _dict_topk(flat[first + int(p)], k)
    return TopK(ids, lps, lp[:, 0].astype(np.float32))


def _dict_topk(entry: dict, k: int) -> tuple[np.ndarray, np.ndarray]:
    from raydistill.teacher.stage import topk_from_logprob_dict

    ids, lps = topk_from_logprob_dict({t: {"logprob": v.logprob, "rank": v.rank} for t, v in entry.items()}, k)
    if len(ids) != k:
        raise ValueError(f"a position holds {len(ids)} log-probs, not top_k = {k}")
    return np.asarray(ids, np.int32), np.asarray(lps, np.float32)


def _topk_via_dicts(flat: Any, k: int, first: int) -> TopK:
    entries = [flat[i] for i in range(first, len(flat))]
    if not entries:
        return _empty(k)
    if any(not e for e in entries):
        raise ValueError("a target position has no log-probs (prompt position 0 has no prediction: target_start must be >= 1)")
    pairs = [_dict_topk(e, k) for e in entries]
    target = [e[next(iter(e))].logprob for e in entries]  # the actual token is the first key vLLM inserts
    return TopK(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), np.asarray(target, np.float32))


def signals_from_output(output: Any, k: int, mode: str, prompt_ids: Sequence[int], target_start: int) -> list[RowSignal]:
    """A finished vLLM ``RequestOutput`` -> one ``RowSignal`` per completion (score mode: one, over the prompt)."""
    prompt = np.asarray(prompt_ids, dtype=np.int32)
    if mode == "score":
        if output.prompt_logprobs is None:
            raise ValueError("the engine returned no prompt log-probs")
        return [RowSignal(prompt, int(target_start), topk_from_flat(output.prompt_logprobs, k, first=int(target_start)), "")]
    rows = []
    for c in output.outputs:
        gen = np.asarray(c.token_ids, dtype=np.int32)
        topk = topk_from_flat(c.logprobs, k) if c.logprobs is not None else None
        if topk is None or len(topk.ids) != len(gen):
            raise ValueError(f"the engine returned log-probs for {0 if topk is None else len(topk.ids)} of {len(gen)} generated tokens")
        rows.append(RowSignal(np.concatenate([prompt, gen]), len(prompt), topk, c.text or ""))
    return rows


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))


def signal_columns(signals: Sequence[RowSignal | None], k: int) -> dict[str, pa.Array]:
    """The per-token columns of ``FULL_SIGNAL_SCHEMA`` for a batch of rows; None (a failed row) is an empty row."""
    empty = RowSignal(np.zeros(0, np.int32), 0, _empty(k), "")
    rows = [s or empty for s in signals]
    n_ids = np.fromiter((len(r.input_ids) for r in rows), np.int64, len(rows))
    n_pos = np.fromiter((len(r.topk.ids) for r in rows), np.int64, len(rows))
    id_off = np.concatenate([[0], np.cumsum(n_ids)])
    pos_off = np.concatenate([[0], np.cumsum(n_pos)])
    cat = lambda xs, dtype, shape: np.concatenate(xs) if xs else np.zeros(shape, dtype)  # noqa: E731
    ids = cat([r.topk.ids for r in rows], np.int32, (0, k))
    lps = cat([r.topk.logprobs for r in rows], np.float32, (0, k))
    inner = np.arange(len(ids) + 1, dtype=np.int64) * k
    return {
        "input_ids": _lists(id_off, cat([r.input_ids for r in rows], np.int32, 0).astype(np.int32)),
        "target_start": pa.array(np.fromiter((r.target_start for r in rows), np.int32, len(rows))),
        "topk_ids": pa.ListArray.from_arrays(pa.array(pos_off, pa.int32()), _lists(inner, ids.reshape(-1).astype(np.int32))),
        "topk_logprobs": pa.ListArray.from_arrays(pa.array(pos_off, pa.int32()), _lists(inner, lps.reshape(-1).astype(np.float32))),
        "target_logprob": _lists(pos_off, cat([r.topk.target for r in rows], np.float32, 0).astype(np.float32)),
    }
