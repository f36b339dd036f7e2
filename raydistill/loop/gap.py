"""How far the student trails the teacher, per row and per domain, from the stored signals alone.

The adaptive loop measures the gap on held-out rows of each domain before it chooses the next
round's data. The teacher's signals are stored, so this costs one student forward pass and no
teacher call: per target token, the forward KL(teacher || student) over the top-k + tail (the
training loss's own ``forward_kl``), the student's NLL of the teacher's token, and whether the
student's greedy token is the teacher's top-1.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

GAP_COLUMNS = ("tokens", "kl", "nll", "top1_agree")


def row_gaps(model, rows: Mapping[str, np.ndarray], max_seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Per-row sums over the target tokens of a batch of signal rows: ``tokens``, ``kl``, ``nll``, ``top1_agree``.

    ``rows`` is a batch as Ray Data hands it (``input_ids``, ``target_start``, ``topk_ids``,
    ``topk_logprobs``); rows longer than ``max_seq_len`` are truncated as in training.
    """
    import torch

    from raydistill.data.collate import collate
    from raydistill.distill.losses import cross_entropy, forward_kl

    batch = collate(rows, max_seq_len, pad_id)
    n_rows = len(rows["input_ids"])
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(batch["input_ids"]), attention_mask=torch.as_tensor(batch["attention_mask"]))
        pos = torch.as_tensor(batch["pred_pos"])
        logits = out.logits[pos[:, 0], pos[:, 1]]
        ids = torch.as_tensor(batch["topk_ids"])
        per_token = {
            "kl": forward_kl(logits, ids, torch.as_tensor(batch["topk_logprobs"])),
            "nll": cross_entropy(logits, torch.as_tensor(batch["targets"])),
            "top1_agree": (logits.argmax(-1) == ids[:, 0]).float(),
        }
    row_of = batch["pred_pos"][:, 0]
    sums = {"tokens": np.bincount(row_of, minlength=n_rows).astype(np.int64)}
    for name, values in per_token.items():
        sums[name] = np.bincount(row_of, weights=values.double().numpy(), minlength=n_rows)
    return sums


def domain_gaps(domains: Sequence[str], sums: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Per-row sums (``row_gaps``) and each row's domain -> per domain: rows, tokens, and the token-weighted mean
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
