"""KD losses over sparse teacher signals: pure functions of student logits and the teacher's top-k.

Shapes: N target tokens, V vocabulary, K kept teacher tokens per position.

The teacher is never dense. Its distribution at a target position is its top-k probabilities
plus one *tail bucket* holding the leftover mass ``1 - sum(top-k)``. The student's distribution
is folded the same way: its probabilities on the teacher's top-k ids, plus its own mass on every
other token as the tail. Both are proper distributions over K+1 outcomes, so every divergence
is >= 0, and exactly 0 when the student matches the teacher.

Temperature ``T``: the student's logits are divided by T. The teacher's stored log-probs are
raw (T=1), and the tempered mass of its unseen tail tokens is unknowable, so the teacher's
top-k log-probs are divided by T and renormalized *within the top-k*, keeping the stored tail
mass unchanged. At T=1 this is the exact stored distribution. The KD term is multiplied by T**2
(Hinton et al.) so its gradient scale does not shrink as T grows.

These functions return per-token losses; the one normalization (mean over the target tokens of
the global batch) happens in ``raydistill.distill.train`` where the global count is known.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Finite stand-in for -inf when masking logits: a fully masked row must still have a finite
# logsumexp, or its (zero-weighted) gradient becomes 0 * nan = nan.
_MASK_VALUE = -1e30
# Floor for the student's tail log-prob. When the top-k covers the whole vocabulary the student
# tail is empty, while the stored teacher tail is float32 rounding (~1e-7); without a floor that
# rounding times log(0) would dominate the loss. e**-100 is far below any real tail mass.
_MIN_TAIL_LOGPROB = -100.0


def teacher_tail_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[N, K] teacher log-probs -> [N] leftover probability mass, clamped to [0, 1]."""
    return (1.0 - topk_logprobs.float().exp().sum(-1)).clamp(0.0, 1.0)


def _folded_teacher(topk_logprobs: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, K] -> [N, K+1] teacher probabilities over (top-k, tail)."""
    lp = topk_logprobs.float()
    tail = teacher_tail_mass(lp)
    if temperature != 1.0:
        top = (1.0 - tail).unsqueeze(-1) * torch.softmax(lp / temperature, dim=-1)
    else:
        top = lp.exp()
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


def _folded_student_logprobs(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, V] logits, [N, K] ids -> [N, K+1] student log-probs over (top-k, tail)."""
    z = logits.float() / temperature
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.gather(-1, topk_ids) - log_z
    tail = torch.logsumexp(z.scatter(-1, topk_ids, _MASK_VALUE), dim=-1, keepdim=True) - log_z
    tail = tail.clamp_min(_MIN_TAIL_LOGPROB)
    return torch.cat([top, tail], dim=-1)


def forward_kl(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token over (top-k, tail).

    logits: [N, V] student logits. topk_ids: [N, K] int64. topk_logprobs: [N, K] teacher log-probs.
    Returns [N] float32, each >= 0.
    """
    p = _folded_teacher(topk_logprobs, temperature)
    log_q = _folded_student_logprobs(logits, topk_ids, temperature)
    # xlogy gives 0 for p = 0 (an empty tail), where p * log p would be nan.
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    return kl.clamp_min(0.0) * temperature**2


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, V] logits, [N] target ids -> [N] token NLL (float32)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


LOSSES = {"forward_kl": forward_kl}


def distill_token_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    loss: str = "forward_kl",
    ce_weight: float = 0.0,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (total, kd, ce), each [N]: total = (1 - ce_weight) * kd + ce_weight * ce."""
    kd = LOSSES[loss](logits, topk_ids, topk_logprobs, temperature)
    ce = cross_entropy(logits, targets)
    return (1.0 - ce_weight) * kd + ce_weight * ce, kd, ce


def chunked_distill_loss_sums(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    loss: str = "forward_kl",
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over tokens of (total, kd, ce), computing logits ``chunk_tokens`` rows at a time.

    hidden: [N, H] final hidden states at the positions that predict ``targets`` [N].
    Each chunk's [chunk, V] logits are recomputed in backward (activation checkpointing) rather
    than kept, so loss memory stays O(chunk * V) instead of O(N * V) at large vocabularies.
    """

    def chunk_sums(h, t, ids, lp):
        total, kd, ce = distill_token_losses(lm_head(h), t, ids, lp, loss, ce_weight, temperature)
        return total.sum(), kd.sum(), ce.sum()

    sums = [hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
    for start in range(0, hidden.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        parts = torch.utils.checkpoint.checkpoint(
            chunk_sums, hidden[sl], targets[sl], topk_ids[sl], topk_logprobs[sl], use_reentrant=False
        )
        sums = [s + p for s, p in zip(sums, parts)]
    return tuple(sums)
