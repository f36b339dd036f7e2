"""The adaptive data loop's policies: pure functions from measured student-teacher gaps to the next round's data.

Each round measures, on held-out rows of each domain, how far the student trails the teacher
(per-row KL on the teacher's stored signals: one student forward pass, no teacher call), then a
policy decides what the next round trains on:

- ``ddk_update``: DDK's domain re-weighting, w <- (1 - beta) * w + beta * softmax(gap / tau). The
  smoothing keeps one noisy round from swinging the mix; the temperature sets how sharply the
  largest gap wins.
- ``select_hard``: the rows the student finds hardest (TAPIR, PGKD), by per-token KL or by the
  fraction of positions where the student's greedy token is not the teacher's top-1, to replay.
- ``allocate`` / ``balanced_sample``: turn domain weights into a row budget per domain (largest
  remainder, so the counts add up exactly) and draw that many rows from each domain, seeded.

They take and return plain Python and numpy values, so they are tested on their own
(tests/unit/test_loop_policies.py) and the round driver stays a thin layer over the stage graph.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np


def _check_weights(weights: Mapping[str, float]) -> None:
    bad = {d: w for d, w in weights.items() if not (w >= 0 and math.isfinite(w))}
    if bad:
        raise ValueError(f"domain weights must be finite and >= 0, got {bad}")


def ddk_update(weights: Mapping[str, float], gaps: Mapping[str, float], beta: float, tau: float) -> dict[str, float]:
    """DDK's update over the domains of ``gaps``: (1 - beta) * w + beta * softmax(gap / tau), normalised to sum to 1.

    A domain without a previous weight starts from the uniform share. Gaps are per-token KLs
    (>= 0); a zero gap is a valid measurement (the student matches the teacher there) and gets
    the smallest share, never none (softmax is positive everywhere).
    """
    if not gaps:
        raise ValueError("ddk_update needs the gap of at least one domain")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"loop.ddk.beta must be in [0, 1], got {beta}")
    if not tau > 0:
        raise ValueError(f"loop.ddk.temperature must be > 0, got {tau}")
    bad = {d: g for d, g in gaps.items() if not math.isfinite(g)}
    if bad:
        raise ValueError(f"gaps must be finite, got {bad}")
    _check_weights(weights)
    domains = sorted(gaps)
    prior = np.array([weights.get(d, 1.0 / len(domains)) for d in domains], dtype=np.float64)
    prior = prior / prior.sum() if prior.sum() > 0 else np.full(len(domains), 1.0 / len(domains))
    g = np.array([gaps[d] for d in domains], dtype=np.float64) / tau
    target = np.exp(g - g.max())
    target /= target.sum()
    new = (1.0 - beta) * prior + beta * target
    return dict(zip(domains, (new / new.sum()).tolist()))


def select_hard(row_ids: Sequence[str], scores: Sequence[float], fraction: float) -> list[str]:
    """The ``fraction`` of rows with the highest scores (per-token KL, or the greedy-disagreement rate), hardest first.

    ceil(fraction * n) rows, so any positive fraction of a non-empty set replays at least one;
    ties go to the smaller id, so the choice does not depend on the order the rows came in.
    Rows whose score is NaN (no target tokens) are never chosen.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"loop.hard.fraction must be in [0, 1], got {fraction}")
    if len(row_ids) != len(scores):
        raise ValueError(f"{len(row_ids)} row ids but {len(scores)} scores")
    scored = [(float(s), i) for i, s in zip(row_ids, scores) if not math.isnan(float(s))]
    k = math.ceil(fraction * len(scored))
    return [i for _, i in sorted(scored, key=lambda t: (-t[0], t[1]))[:k]]


def disagreement_rate(student_top1: np.ndarray, teacher_top1: np.ndarray) -> float:
    """The fraction of a row's target positions where the student's greedy token is not the teacher's top-1 (NaN if none)."""
    student_top1, teacher_top1 = np.asarray(student_top1), np.asarray(teacher_top1)
    if student_top1.shape != teacher_top1.shape:
        raise ValueError(f"shapes differ: {student_top1.shape} vs {teacher_top1.shape}")
    return float(np.mean(student_top1 != teacher_top1)) if student_top1.size else float("nan")


def allocate(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Rows per domain for a budget of ``total``: proportional to ``weights``, largest remainder, summing to ``total`` exactly."""
    if total < 0:
        raise ValueError(f"loop.rows_per_round must be >= 0, got {total}")
    _check_weights(weights)
    domains = sorted(weights)
    w = np.array([weights[d] for d in domains], dtype=np.float64)
    if not len(domains) or w.sum() <= 0:
        raise ValueError("allocate needs at least one domain with a positive weight")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(int)
    # Largest remainders first; ties to the earlier domain name (a stable, order-free rule).
    for j in sorted(range(len(domains)), key=lambda j: (-(exact[j] - counts[j]), domains[j]))[: total - int(counts.sum())]:
        counts[j] += 1
    return dict(zip(domains, counts.tolist()))


def balanced_sample(rows_by_domain: Mapping[str, Sequence[str]], counts: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """Draw ``counts[d]`` row ids from each domain, seeded: without replacement while the domain has enough rows,
    then every row once more before any repeats (a small domain is replayed evenly, not at random)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {}
    for d in sorted(counts):
        n = counts[d]
        rows = sorted(rows_by_domain.get(d, ()))
        if n and not rows:
            raise ValueError(f"domain {d!r} has a budget of {n} rows but no rows to draw from")
        picked: list[str] = []
        while len(picked) < n:
            order = rng.permutation(len(rows))
            picked.extend(rows[i] for i in order[: n - len(picked)])
        out[d] = picked
    return out
