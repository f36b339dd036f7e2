"""The weighted mixture of several teachers' sparse top-k signals at the same positions: ``mix_topk``.

Every teacher scored the same token ids, so position p of teacher i holds its top-k_i ids and raw
(T=1) log-probs. The mixture keeps, at each position, the union U of the teachers' lists with

    p(v) = sum_i w_i * p_i(v)   over the teachers i whose top-k contains v,

weights normalised to sum to 1 (``normalize_weights``). A teacher's mass on a union token that is
*outside its own* top-k is unknown (the engine returned only its top k_i), so it is left out of
p(v) and stays in the implicit tail bucket, like everything else each teacher did not list.

**The tail bound.** Each teacher's listed mass is counted exactly once, so the stored tail is

    1 - sum_{v in U} p(v) = sum_i w_i * tail_i                    (tail_i = 1 - sum(top-k_i))
                          = (true mixture mass outside U) + m,
    m = sum_i w_i * p_i(U minus top-k_i)  (the unknown part)
    0 <= m <= sum_i w_i * min(tail_i, |U minus top-k_i| * min_{v in top-k_i} p_i(v)),

the last because a token outside teacher i's top-k is no likelier under i than its k-th one. So
the stored tail never undercounts the mixture's tail, and overcounts it by at most
``unseen_union_mass_bound``. The tail is exact when the teachers' top-k lists coincide, or when
k is the vocabulary.

**Layout and mask.** The output is [P, W] with W = sum_i k_i, the widest a union can be, for every
batch: the signals then hold one width for the whole run, which ``collate`` needs (a micro-batch
draws rows from many mixture batches, and every position of a batch must have the same width),
and ``k`` in the metadata stays one number. Padding is in-band: id ``MASK_ID`` (-1) with log-prob
``MASK_LOGPROB`` (-inf). No extra column is needed in the signals, collate carries it unchanged,
exp(-inf) = 0 keeps every sum of probabilities (and so the implicit tail) right without knowing
about the mask, and the losses treat any negative id as absent (``raydistill.distill.losses``).
``collate`` drops top-k columns that are padding at every target of a micro-batch, so the loss
works at the widest union of its batch, not at W. Entries are sorted by mixture probability,
most likely first (ties: smaller id first), and the padding comes last, so column 0 is the
mixture's top-1 as for a single teacher.

Everything is vectorised over positions and entries: one sort of the [P, W] candidates by id
puts a token's entries from different teachers side by side, and segment reductions
(``np.maximum.reduceat``, ``np.bincount``) combine them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MASK_ID = -1
MASK_LOGPROB = -np.inf


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Teacher weights -> float64 [n] summing to 1. Each must be positive and finite."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w):
        raise ValueError(f"weights: need one weight per teacher, got {weights!r}")
    bad = np.flatnonzero(~(np.isfinite(w) & (w > 0)))
    if len(bad):
        raise ValueError(f"weights[{bad[0]}]: {w[bad[0]]} is not a positive finite number")
    return w / w.sum()


def mix_topk(
    ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], weights: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Teachers' top-k at the same P positions -> their weighted mixture over the union, padded.

    ids[i]: [P, k_i] int token ids of teacher i (negative = absent, so mixtures can be mixed);
    logprobs[i]: [P, k_i] raw (T=1) log-probs; weights: [n] positive, normalised here.
    Returns (ids [P, W] with MASK_ID padding, log-probs [P, W] with MASK_LOGPROB padding),
    W = sum k_i, most likely first. Ids keep the inputs' signed integer type (int32 from the
    engine), log-probs their float type (at least float32); the sums are taken in float64.
    """
    w = normalize_weights(weights)
    ids = [np.asarray(a) for a in ids]
    lps = [np.asarray(a) for a in logprobs]
    if not (len(ids) == len(lps) == len(w)):
        raise ValueError(f"need ids, log-probs and a weight for each teacher, got {len(ids)}, {len(lps)}, {len(w)}")
    n_pos = ids[0].shape[0] if ids[0].ndim == 2 else -1
    for i, (a, b) in enumerate(zip(ids, lps)):
        if a.ndim != 2 or a.shape != b.shape or a.shape[0] != n_pos:
            raise ValueError(f"teacher {i}: ids {a.shape} and log-probs {b.shape} must both be [P, k] with P = {n_pos}")
    ks = [a.shape[1] for a in ids]
    width = sum(ks)
    id_dtype = np.result_type(*(a.dtype for a in ids))
    id_dtype = id_dtype if id_dtype.kind == "i" else np.dtype(np.int64)
    lp_dtype = np.result_type(np.float32, *(b.dtype for b in lps))
    out_ids = np.full((n_pos, width), MASK_ID, id_dtype)
    out_lps = np.full((n_pos, width), MASK_LOGPROB, lp_dtype)
    if not n_pos or not width:
        return out_ids, out_lps

    cand = np.concatenate([a.astype(np.int64, copy=False) for a in ids], axis=1)  # [P, W]
    cand_lp = np.concatenate([b.astype(np.float64, copy=False) for b in lps], axis=1)
    cand_w = np.repeat(w, ks)  # [W]: each column's teacher weight
    by_id = np.argsort(cand, axis=1, kind="stable")
    sid = np.take_along_axis(cand, by_id, 1)
    slp = np.take_along_axis(cand_lp, by_id, 1).ravel()
    sw = cand_w[by_id].ravel()
    first = np.ones(sid.shape, bool)
    first[:, 1:] = sid[:, 1:] != sid[:, :-1]  # a new token starts here (column 0: a new position too)
    starts = np.flatnonzero(first)
    seg = np.cumsum(first.ravel()) - 1  # each entry's (position, token) segment

    # log sum_j w_j exp(lp_j) as ref + log sum_j w_j exp(lp_j - ref), ref the segment's largest lp:
    # no underflow, and a token one teacher alone lists gets lp + log w, while identical teachers
    # give sum_j w_j = 1 and the teacher's own log-prob back, bit for bit.
    ref = np.maximum.reduceat(slp, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.exp(slp - ref[seg])
        rel[np.isnan(rel)] = 0.0  # -inf - -inf: every entry of the segment has probability 0
        mixed = ref + np.log(np.bincount(seg, weights=sw * rel, minlength=len(starts)))

    seg_id = sid.ravel()[starts]
    keep = seg_id >= 0  # the segment of absent (negative) ids is padding, not a token
    row = starts[keep] // width
    col = (np.cumsum(first, axis=1) - 1).ravel()[starts[keep]]
    # Sort key: -log p ascending; NaN (no token there) sorts after everything, -inf log-probs included.
    key = np.full((n_pos, width), np.nan)
    key[row, col] = -mixed[keep]
    by_prob = np.argsort(key, axis=1, kind="stable")  # stable: ties stay in id order
    out_ids[row, col] = seg_id[keep]
    out_lps[row, col] = mixed[keep]
    return np.take_along_axis(out_ids, by_prob, 1), np.take_along_axis(out_lps, by_prob, 1)


def mix_logprobs(logprobs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Teachers' log-probs of the same tokens (e.g. ``target_logprob``, [P] each) -> the mixture's, [P] float64.

    Exact, unlike the top-k: every teacher knows its own probability of the token. NaN (unknown)
    in any teacher gives NaN.
    """
    w = normalize_weights(weights)
    lp = np.stack([np.asarray(a, dtype=np.float64) for a in logprobs])  # [n, P]
    if lp.shape[0] != len(w):
        raise ValueError(f"need a weight for each teacher, got {lp.shape[0]} log-prob arrays and {len(w)} weights")
    ref = lp.max(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.exp(lp - ref)
        rel = np.where(np.isneginf(ref), 0.0, rel)
        return ref + np.log((w[:, None] * rel).sum(axis=0))


def unseen_union_mass_bound(
    ids: Sequence[np.ndarray], logprobs: Sequence[np.ndarray], weights: Sequence[float], mixed_ids: np.ndarray
) -> np.ndarray:
    """[P] upper bound on m, the mass the stored mixture tail overcounts (see the module docstring).

    ``ids``, ``logprobs``, ``weights`` as given to ``mix_topk``; ``mixed_ids`` [P, W] its output ids.
    """
    w = normalize_weights(weights)
    union = (np.asarray(mixed_ids) >= 0).sum(axis=1)
    bound = np.zeros(len(union))
    for wi, a, b in zip(w, ids, logprobs):  # a loop over teachers, not positions
        valid = np.asarray(a) >= 0
        lp = np.where(valid, np.asarray(b, dtype=np.float64), -np.inf)
        tail = np.clip(1.0 - np.exp(lp).sum(axis=1), 0.0, 1.0)
        smallest = np.exp(np.min(lp, axis=1, initial=0.0, where=valid))
        bound += wi * np.minimum(tail, (union - valid.sum(axis=1)) * smallest)
    return bound
