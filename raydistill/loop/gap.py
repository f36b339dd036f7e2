"""How far the student trails the teacher, per row and per domain, from the stored signals alone.

The adaptive loop measures the gap on held-out rows of each domain before it chooses the next
round's data. The teacher's signals are stored, so this costs one student forward pass and no
teacher call: per target token, the forward KL(teacher || student) over the top-k + tail (the
training loss's own ``forward_kl``), the student's NLL of the teacher's token, and whether the
student's greedy token is the teacher's top-1. The per-row sums are the eval stage's scorer's
(``raydistill.eval.stage.PairScorer`` without a teacher model, ``score_rows``); here they are
combined per domain.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

GAP_COLUMNS = ("tokens", "kl", "nll", "top1_agree")


def domain_gaps(domains: Sequence[str], sums: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Per-row sums (``score_rows``: tokens, kl, nll, top1_agree) and each row's domain -> per domain: rows, tokens, and the token-weighted mean
    ``kl``, ``nll`` and ``top1_agreement``. A domain whose rows have no target tokens gets NaN means."""
    domains = list(domains)
    tokens = np.asarray(sums["tokens"], dtype=np.float64)
    if len(domains) != len(tokens):
        raise ValueError(f"{len(domains)} domains for {len(tokens)} rows")
    out: dict[str, dict[str, float]] = {}
    for d in sorted(set(domains)):
        mask = np.array([x == d for x in domains])
        n_tok = tokens[mask].sum()
        mean = (lambda name: float(np.asarray(sums[name], dtype=np.float64)[mask].sum() / n_tok) if n_tok else float("nan"))  # noqa: E731
        out[d] = {"rows": int(mask.sum()), "tokens": int(n_tok), "kl": mean("kl"), "nll": mean("nll"), "top1_agreement": mean("top1_agree")}
    return out
