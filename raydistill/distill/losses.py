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

Every KD loss has the signature ``fn(logits [N, V], topk_ids [N, K] int64, topk_logprobs [N, K],
temperature=1.0, **params) -> [N] float32``; ``params`` are the loss's own keyword-only settings
(``beta`` for ``jsd``, ``alpha`` for the skew KLs), and ``loss_params`` picks them from a
``DistillSpec``. Each returns values >= 0 (tiny negative rounding is clamped), already scaled by
T**2.

These functions return per-token losses; the one normalization (mean over the target tokens of
the global batch) happens in ``raydistill.distill.train`` where the global count is known.

Masked entries: a negative id in ``topk_ids`` marks a padding entry (``raydistill.teacher.ensemble``
pads the union of several teachers' top-k lists to a fixed width with id -1 and log-prob -inf).
It is no outcome at all: the teacher's probability there is 0 and the student's is 0 too, so it
adds nothing to the student's top-k mass, takes nothing from its tail, and adds exactly 0 to
every divergence and its gradient. The teacher's log-prob at a masked entry is ignored (treated
as -inf) whatever is stored. Rows without masked entries compute exactly what they did before.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

# Finite stand-in for -inf when masking logits: a fully masked row must still have a finite
# logsumexp, or its (zero-weighted) gradient becomes 0 * nan = nan.
_MASK_VALUE = -1e30
# Floor for the student's tail log-prob. When the top-k covers the whole vocabulary the student
# tail is empty, while the stored teacher tail is float32 rounding (~1e-7); without a floor that
# rounding times log(0) would dominate the loss. e**-100 is far below any real tail mass.
_MIN_TAIL_LOGPROB = -100.0


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    # float64 teacher log-probs stay float64: 1 - sum(top-k) cancels, and a tiny tail needs the bits.
    return x if x.dtype == torch.float64 else x.float()


def teacher_tail_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[N, K] teacher log-probs -> [N] leftover probability mass, clamped to [0, 1]."""
    return (1.0 - _at_least_float32(topk_logprobs).exp().sum(-1)).clamp(0.0, 1.0)


def _folded_teacher(topk_logprobs: torch.Tensor, temperature: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] -> [N, K+1] teacher probabilities over (top-k, tail); [N, K] ``valid`` False gives p = 0 exactly."""
    lp = _at_least_float32(topk_logprobs)
    if valid is not None:
        # Finite, not -inf: the tempered softmax of a fully masked row must not be 0/0.
        lp = lp.masked_fill(~valid, _MASK_VALUE)
    tail = teacher_tail_mass(lp)
    if temperature != 1.0:
        top = (1.0 - tail).unsqueeze(-1) * torch.softmax(lp / temperature, dim=-1)
    else:
        top = lp.exp()
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


# Below this student tail mass the tail is taken from a masked logsumexp over the vocabulary
# instead of 1 - sum(top-k): that difference loses float32 precision as it nears 0 (absolute
# error ~1e-7, so at 1e-2 the tail is still exact to ~1e-5 relative).
_CHEAP_TAIL_MIN = 1e-2


def _fill_masked_ids(topk_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[N, K] ids with each masked (negative) id replaced by the first valid id of its row (0 if none).

    The student's values at masked entries are discarded, but gather and scatter need a real
    index; a duplicate of the row's own id is one that changes nothing in the exact-tail scatter
    below (which masks the top-k ids out of the vocabulary), where any other id would mask a
    token that is not there. A row with no valid id never takes that path: its top mass is 0.
    """
    if not topk_ids.shape[-1]:  # argmax has nothing to reduce
        return topk_ids
    first = topk_ids.gather(-1, valid.float().argmax(-1, keepdim=True)).clamp_min(0)
    return torch.where(valid, topk_ids, first)


def _student_tail_logprob(z: torch.Tensor, log_z: torch.Tensor, top: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[N, 1] log of the student's mass outside its top-k ids.

    ``topk_ids`` [N, K] must be valid indices (masked ones filled by ``_fill_masked_ids``) and
    ``top`` [N, K] the log-probs at them, with masked entries at ``_MASK_VALUE`` (exp = 0).

    Mostly ``log(1 - sum(exp(top)))`` from the [N, K] top-k log-probs already at hand; only rows
    whose tail is small enough to suffer cancellation take a masked logsumexp over their [V]
    logits. Computing that for every row would cost a full [N, V] copy and a second pass over
    the vocabulary, which made KD + CE a quarter slower than CE alone.
    """
    top_mass = top.exp().sum(-1, keepdim=True)
    # The clamp keeps log1p finite (and its gradient 0, not nan) on rows replaced below.
    tail = torch.log1p(-top_mass.clamp(max=1.0 - _CHEAP_TAIL_MIN / 2))
    small = (1.0 - top_mass.detach()).squeeze(-1) < _CHEAP_TAIL_MIN
    if small.any():
        rows = small.nonzero().squeeze(-1)
        z_rows = z.index_select(0, rows).scatter(-1, topk_ids.index_select(0, rows), _MASK_VALUE)
        exact = torch.logsumexp(z_rows, dim=-1, keepdim=True) - log_z.index_select(0, rows)
        tail = tail.index_put((rows,), exact)
    return tail.clamp_min(_MIN_TAIL_LOGPROB)


class _LogSoftmaxAt(torch.autograd.Function):
    """log_softmax(z) read at ``idx`` ([N, V], [N, J] -> [N, J]), plus logsumexp(z) [N, 1], without a dense log_softmax.

    Autograd of ``z.gather(idx) - logsumexp(z)`` builds the gradient in about eight passes over
    the [N, V] logits (logsumexp's backward subtracts, exponentiates and multiplies; each gather's
    backward fills a dense zero tensor and scatters into it; the pieces are then added), which made
    the KD loss several times the cost of a fused cross-entropy. Here it is one: softmax(z) times
    the log_z coefficient, computed in place, plus a sparse scatter of the J gathered gradients.
    """

    @staticmethod
    def forward(ctx, z, idx):
        log_z = torch.logsumexp(z, dim=-1, keepdim=True)
        ctx.save_for_backward(z, idx, log_z)
        return z.gather(-1, idx) - log_z, log_z

    @staticmethod
    def backward(ctx, g_at, g_log_z):
        z, idx, log_z = ctx.saved_tensors
        # d/dz_v of (z[idx_j] - log_z) is 1[v = idx_j] - softmax_v; of log_z it is softmax_v.
        coef = -g_at.sum(-1, keepdim=True)
        if g_log_z is not None:
            coef = coef + g_log_z
        grad = torch.sub(z, log_z).exp_().mul_(coef)
        return grad.scatter_add_(-1, idx, g_at), None


def _student_parts(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float,
                   targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[N, V] logits, [N, K] ids -> ([N, K+1] folded student log-probs at ``temperature``, z, log_z, log q(target)).

    ``z`` [N, V] are the float32 logits divided by the temperature and ``log_z`` [N, 1] their
    logsumexp. With ``targets`` [N], their log-probs at ``temperature`` come from the same pass
    (the CE term at T=1 and the sampled reverse KL reuse it); otherwise the last item is None.
    Masked (negative) ids get the log-prob ``_MASK_VALUE``: q = 0 exactly, yet finite, so that a
    teacher p = 0 times it is 0 and not nan; the mask makes it a constant, so no gradient flows there.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    valid = topk_ids >= 0
    ids = _fill_masked_ids(topk_ids, valid)
    idx = ids if targets is None else torch.cat([ids, targets.unsqueeze(-1)], dim=-1)
    at, log_z = _LogSoftmaxAt.apply(z, idx)
    k = topk_ids.shape[-1]
    top = at[:, :k].masked_fill(~valid, _MASK_VALUE)
    folded = torch.cat([top, _student_tail_logprob(z, log_z, top, ids)], dim=-1)
    return folded, z, log_z, (at[:, k] if targets is not None else None)


def _folded_student_logprobs(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, V] logits, [N, K] ids -> [N, K+1] student log-probs over (top-k, tail)."""
    return _student_parts(logits, topk_ids, temperature)[0]


def _teacher_parts(topk_logprobs: torch.Tensor, temperature: float, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] (and [N, K] bool ``valid``) -> ([N, K+1] folded teacher probs p, their log-probs).

    The teacher's log-probs are floored like the student's tail: a zero teacher tail (K == V, or
    a top-k holding all the mass to float32 precision) would otherwise put log 0 = -inf into
    every term where the student's mass multiplies log p (reverse KL, mixtures). A floored
    outcome with p = 0 still contributes exactly 0 wherever p multiplies it.
    """
    p = _folded_teacher(topk_logprobs, temperature, valid)
    return p, p.log().clamp_min(_MIN_TAIL_LOGPROB)


def _kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """[N, K+1] probs a and log-probs of a, b -> [N] KL(a || b). Outcomes with a = 0 add 0."""
    return (a * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) in log space, so a mixture of tiny masses never underflows to log 0."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _check_weight(name: str, value: float, *, low_closed: bool) -> None:
    ok = (0.0 <= value < 1.0) if low_closed else (0.0 < value < 1.0)
    if not ok:
        interval = "[0, 1)" if low_closed else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")


# The divergences over folded distributions: (p, log p, log q), each [N, K+1] -> [N], before
# clamping and the T**2 factor. The public functions below and ``distill_token_losses`` share them.
def _forward_kl_folded(p, log_p, log_q):
    # xlogy gives 0 for p = 0 (an empty tail), where p * log p would be nan.
    return (torch.xlogy(p, p) - p * log_q).sum(-1)


def _reverse_kl_folded(p, log_p, log_q):
    return _kl(log_q.exp(), log_q, log_p)


def _jsd_folded(p, log_p, log_q, *, beta: float = 0.5):
    _check_weight("beta", beta, low_closed=False)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(p, log_p, log_m) + (1.0 - beta) * _kl(log_q.exp(), log_q, log_m)


def _skew_forward_kl_folded(p, log_p, log_q, *, alpha: float = 0.1):
    _check_weight("alpha", alpha, low_closed=True)
    return _kl(p, log_p, _log_mix(log_p, log_q, alpha))


def _skew_reverse_kl_folded(p, log_p, log_q, *, alpha: float = 0.1):
    _check_weight("alpha", alpha, low_closed=True)
    return _kl(log_q.exp(), log_q, _log_mix(log_q, log_p, alpha))


def _tvd_folded(p, log_p, log_q):
    return 0.5 * (p - log_q.exp()).abs().sum(-1)


_FOLDED = {
    "forward_kl": _forward_kl_folded,
    "reverse_kl": _reverse_kl_folded,
    "jsd": _jsd_folded,
    "skew_forward_kl": _skew_forward_kl_folded,
    "skew_reverse_kl": _skew_reverse_kl_folded,
    "tvd": _tvd_folded,
}


def _divergence(
    name: str, log_q: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float, params: dict, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, K+1] folded student log-probs, [N, K] teacher log-probs (and bool ``valid``) -> [N] loss, >= 0, times T**2.

    At a masked entry p = 0, log p = -100 (the floor) and log q = ``_MASK_VALUE``, q = 0: every
    divergence's term there is 0 times a finite number (KL, JSD, skew KL) or |0 - 0| (TVD),
    exactly 0, so no explicit masking of the terms is needed.
    """
    p, log_p = _teacher_parts(topk_logprobs, temperature, valid)
    return _FOLDED[name](p, log_p, log_q, **params).clamp_min(0.0) * temperature**2


def _kd(name: str, logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float, params: dict) -> torch.Tensor:
    log_q = _folded_student_logprobs(logits, topk_ids, temperature)
    return _divergence(name, log_q, topk_logprobs, temperature, params, topk_ids >= 0)


def forward_kl(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token over (top-k, tail).

    logits: [N, V] student logits. topk_ids: [N, K] int64. topk_logprobs: [N, K] teacher log-probs.
    Returns [N] float32, each >= 0.
    """
    return _kd("forward_kl", logits, topk_ids, topk_logprobs, temperature, {})


def reverse_kl(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) per token over (top-k, tail): mode-seeking.

    logits: [N, V] student logits. topk_ids: [N, K] int64. topk_logprobs: [N, K] teacher log-probs.
    Returns [N] float32, each >= 0. Where the teacher's tail is empty, student tail mass is
    charged against the floored log-prob (-100), a strong but finite penalty.
    """
    return _kd("reverse_kl", logits, topk_ids, topk_logprobs, temperature, {})


def jsd(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0, *, beta: float = 0.5
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence per token over (top-k, tail).

    With teacher p, student q and mixture m = beta * p + (1 - beta) * q:
    JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m). beta = 0.5 is the symmetric JSD,
    bounded by log 2 (before the T**2 factor). This is the convention of TRL's GKD
    ``generalized_jsd_loss``. beta must be in (0, 1): at either end the formula is identically 0;
    use ``forward_kl`` or ``reverse_kl`` for those limits.

    logits: [N, V] student logits. topk_ids: [N, K] int64. topk_logprobs: [N, K] teacher log-probs.
    Returns [N] float32, each >= 0.
    """
    return _kd("jsd", logits, topk_ids, topk_logprobs, temperature, {"beta": beta})


def skew_forward_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0, *, alpha: float = 0.1
) -> torch.Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024) per token over (top-k, tail): KL(p || alpha * p + (1 - alpha) * q).

    p is the teacher, q the student. alpha in [0, 1); alpha = 0 is ``forward_kl``. Mixing in the
    teacher keeps the target's denominator away from 0, which bounds the loss by log(1 / alpha)
    and its gradients where the student puts almost no mass on a teacher token.

    logits: [N, V] student logits. topk_ids: [N, K] int64. topk_logprobs: [N, K] teacher log-probs.
    Returns [N] float32, each >= 0.
    """
    return _kd("skew_forward_kl", logits, topk_ids, topk_logprobs, temperature, {"alpha": alpha})


def skew_reverse_kl(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0, *, alpha: float = 0.1
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM) per token over (top-k, tail): KL(q || alpha * q + (1 - alpha) * p).

    p is the teacher, q the student. alpha in [0, 1); alpha = 0 is ``reverse_kl``. For alpha > 0
    the loss is bounded by log(1 / alpha) even where the teacher's tail is empty.

    logits: [N, V] student logits. topk_ids: [N, K] int64. topk_logprobs: [N, K] teacher log-probs.
    Returns [N] float32, each >= 0.
    """
    return _kd("skew_reverse_kl", logits, topk_ids, topk_logprobs, temperature, {"alpha": alpha})


def tvd(logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance per token over (top-k, tail): 0.5 * sum |p - q|, in [0, 1] before T**2.

    logits: [N, V] student logits. topk_ids: [N, K] int64. topk_logprobs: [N, K] teacher log-probs.
    Returns [N] float32, each >= 0.
    """
    return _kd("tvd", logits, topk_ids, topk_logprobs, temperature, {})


SAMPLED_LOSS = "sampled_reverse_kl"


def _sampled_reverse_kl(log_q_x: torch.Tensor, target_logprob: torch.Tensor, estimator: str) -> torch.Tensor:
    """[N] student log q(x) and teacher log p(x) at the sampled tokens x ~ q -> [N] per-token loss.

    'pg': the value is the k1 estimate log q(x) - log p(x) (its mean over x ~ q is KL(q || p)),
    and the gradient is stop_grad(log q(x) - log p(x)) * grad log q(x), the policy-gradient form
    of the reverse KL's gradient at each visited state (the score-function term; differentiating
    k1 directly gives E[grad log q] = 0). 'k3': r - 1 - log r with r = p(x)/q(x), >= 0 for every
    sample, differentiated directly (Schulman's low-variance estimator).
    """
    if estimator == "pg":
        advantage = (log_q_x - target_logprob).detach()
        return advantage + advantage * (log_q_x - log_q_x.detach())
    if estimator == "k3":
        log_r = target_logprob - log_q_x
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown sampled estimator {estimator!r}; choose 'pg' or 'k3'")


def sampled_reverse_kl(
    logits: torch.Tensor, targets: torch.Tensor, target_logprob: torch.Tensor, temperature: float = 1.0, estimator: str = "pg"
) -> torch.Tensor:
    """Reverse KL(student || teacher) estimated at the student's own sampled tokens, per token.

    logits: [N, V] student logits. targets: [N] the tokens the student sampled. target_logprob:
    [N] the teacher's log-prob of each. Returns [N] float32 (k1 values can be negative; their
    mean over samples is the KL), times T**2 like every KD loss.
    """
    z = logits.float() / temperature if temperature != 1.0 else logits.float()
    log_q_x = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return _sampled_reverse_kl(log_q_x, target_logprob.float(), estimator) * temperature**2


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, V] logits, [N] target ids -> [N] token NLL (float32)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


LOSSES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def loss_params(distill: Any) -> dict[str, Any]:
    """The keyword settings of ``distill.loss`` taken from a ``DistillSpec`` (or anything with its fields)."""
    if distill.loss == SAMPLED_LOSS:
        return {"estimator": distill.sampled_estimator}
    if distill.loss == "jsd":
        return {"beta": distill.jsd_beta}
    if distill.loss in ("skew_forward_kl", "skew_reverse_kl"):
        return {"alpha": distill.skew_alpha}
    return {}


def distill_token_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    loss: str = "forward_kl",
    ce_weight: float = 0.0,
    temperature: float = 1.0,
    loss_params: dict[str, Any] | None = None,
    target_logprob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (total, kd, ce), each [N]: total = (1 - ce_weight) * kd + ce_weight * ce.

    ``loss_params`` are keyword settings of the chosen loss (e.g. ``{"beta": 0.5}`` for ``jsd``).
    ``target_logprob`` [N] is the teacher's log-prob of each target token; 'sampled_reverse_kl'
    uses it on the student's own samples, and without it (teacher-written tokens) falls back to
    the top-k 'reverse_kl', since the sampled estimator is only valid for x ~ student.
    """
    params = dict(loss_params or {})
    if loss == SAMPLED_LOSS and target_logprob is None:
        loss = "reverse_kl"
        params.pop("estimator", None)
    if loss not in _FOLDED and loss != SAMPLED_LOSS:
        raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES) + [SAMPLED_LOSS]}")
    log_q, z, log_z, log_q_target = _student_parts(logits, topk_ids, temperature, targets)
    if loss == SAMPLED_LOSS:
        kd = _sampled_reverse_kl(log_q_target, target_logprob.float(), params.get("estimator", "pg")) * temperature**2
    else:
        kd = _divergence(loss, log_q, topk_logprobs, temperature, params, topk_ids >= 0)
    if temperature == 1.0:
        # The KD term's logsumexp is the CE's too: one pass over the vocabulary, not two.
        ce = -log_q_target
    else:
        ce = cross_entropy(logits, targets)
    return (1.0 - ce_weight) * kd + ce_weight * ce, kd, ce


class _FusedLinearLoss(torch.autograd.Function):
    """Sums of a per-token loss over ``lm_head(hidden)``, one chunk of tokens at a time, with the
    chunk's gradients computed during the forward pass.

    Each chunk's [chunk, V] logits exist only while that chunk is processed: the loss's gradient
    with respect to them is taken at once and turned into the chunk's hidden-state gradient and
    its share of the head's weight gradient (accumulated in place). Backward then only scales
    the stored gradients. This is the approach of Liger-Kernel's fused linear cross-entropy,
    written over torch autograd so that every loss of the family works unchanged; we do not
    depend on Liger because it has no top-k + tail KD losses and no CPU path. Against
    checkpointing, which recomputes each chunk's logits in backward, it saves one [chunk, H] x
    [H, V] matmul per chunk, so it costs the naive loss's three, with the naive loss's O(N * V)
    logits never held at once. Under ZeRO-3, where each head call is a collective (see
    ``chunked_distill_loss_sums``), only for a frozen head whose weight the caller gathers around
    the call: backward then needs nothing of the head.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, chunk_fn, chunk_tokens, *chunk_args):
        needs_h, needs_w = hidden.requires_grad, weight.requires_grad
        needs_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(hidden) if needs_h else None
        # The weight gradient accumulates in at least float32 whatever the head's dtype (bf16 sums
        # of many chunks would lose bits); it is cast back once, in backward.
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs_b else None
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            h = hidden[sl].detach()
            with torch.enable_grad():
                logits = F.linear(h, weight.detach(), None if bias is None else bias.detach()).requires_grad_(True)
                total, kd, ce = chunk_fn(logits, *(a[sl] for a in chunk_args))
                (g_logits,) = torch.autograd.grad(total, logits)
            sums += torch.stack([total.detach().float(), kd.detach().float(), ce.detach().float()])
            if needs_h:
                grad_h[sl] = g_logits @ weight.detach()
            if needs_w:
                grad_w.addmm_(g_logits.t().to(acc), h.to(acc))
            if needs_b:
                grad_b += g_logits.to(acc).sum(0)
            del logits, g_logits
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.has = (needs_h, needs_w, needs_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.n_chunk_args = len(chunk_args)
        kd_sum, ce_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return sums[0].clone(), kd_sum, ce_sum

    @staticmethod
    def backward(ctx, g_total, _g_kd, _g_ce):
        saved = iter(ctx.saved_tensors)
        needs_h, needs_w, needs_b = ctx.has
        grad_h = next(saved) * g_total if needs_h else None
        grad_w = (next(saved) * g_total).to(ctx.dtypes[0]) if needs_w else None
        grad_b = (next(saved) * g_total).to(ctx.dtypes[1]) if needs_b else None
        return (grad_h, grad_w, grad_b, None, None) + (None,) * ctx.n_chunk_args


def fused_linear_loss_sums(hidden: torch.Tensor, lm_head: torch.nn.Linear, chunk_fn, chunk_tokens: int, *chunk_args: torch.Tensor):
    """(total, kd, ce) sums of ``chunk_fn(logits_chunk, *args_chunk)`` over ``lm_head(hidden)`` in chunks.

    hidden: [N, H]; each of ``chunk_args`` has N rows and is sliced with the chunk. ``chunk_fn``
    returns three scalar sums, and only the first is differentiated. See ``_FusedLinearLoss``.
    """
    return _FusedLinearLoss.apply(hidden, lm_head.weight, lm_head.bias, chunk_fn, chunk_tokens, *chunk_args)


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
    loss_params: dict[str, Any] | None = None,
    always_recompute: bool = False,
    target_logprob: torch.Tensor | None = None,
    always_fuse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over tokens of (total, kd, ce), computing logits ``chunk_tokens`` rows at a time.

    hidden: [N, H] final hidden states at the positions that predict ``targets`` [N].
    With more than one chunk, no chunk's [chunk, V] logits outlive it, so loss memory stays
    O(chunk * V) instead of O(N * V) at large vocabularies: an ``nn.Linear`` head gets the fused
    path (each chunk's gradients computed in the forward pass, ``_FusedLinearLoss``), any other
    head activation checkpointing (logits recomputed in backward).
    ``loss_params`` are passed to the loss as in ``distill_token_losses``. ``always_recompute``
    checkpoints every chunk, a single one too: under ZeRO-3 every LM-head call is a collective
    (parameter gathering in forward, recompute and backward), so all ranks must call it the
    same way whatever their token counts, and the fused path's direct use of the weight would
    bypass the gathering. ``always_fuse`` takes the fused path for every chunk count, a single
    chunk too, so that nothing of the head is used after this call returns (the head must be an
    ``nn.Linear``): for a frozen head that the caller gathers only around this call (ZeRO-3, see
    ``raydistill.distill.train._zero3_frozen_head``). ``target_logprob`` [N], when given, is sliced
    with the chunks and passed to the loss (see ``distill_token_losses``).
    """
    if always_fuse and (always_recompute or type(lm_head) is not torch.nn.Linear):
        raise ValueError("always_fuse needs a plain nn.Linear head and excludes always_recompute")
    args = (targets, topk_ids, topk_logprobs) + (() if target_logprob is None else (target_logprob,))

    def logit_sums(logits, t, ids, lp, tl=None):
        total, kd, ce = distill_token_losses(logits, t, ids, lp, loss, ce_weight, temperature, loss_params, tl)
        return total.sum(), kd.sum(), ce.sum()

    def chunk_sums(h, *chunk_args):
        return logit_sums(lm_head(h), *chunk_args)

    if hidden.shape[0] <= chunk_tokens and not (always_recompute or always_fuse):
        # One chunk: its logits are within the O(chunk * V) bound already, so keeping them for
        # backward costs no extra memory and saves recomputing the LM head (a third of its cost).
        return chunk_sums(hidden, *args)
    if not always_recompute and type(lm_head) is torch.nn.Linear:
        return fused_linear_loss_sums(hidden, lm_head, logit_sums, chunk_tokens, *args)
    sums = [hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
    for start in range(0, hidden.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        parts = torch.utils.checkpoint.checkpoint(chunk_sums, hidden[sl], *(a[sl] for a in args), use_reentrant=False)
        sums = [s + p for s, p in zip(sums, parts)]
    return tuple(sums)
