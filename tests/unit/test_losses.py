"""KD losses against dense float64 references on a small vocabulary."""

import pytest
import torch

from raydistill.distill.losses import chunked_distill_loss_sums, cross_entropy, distill_token_losses, forward_kl, teacher_tail_mass

V, N, K = 37, 11, 5


def _teacher(seed, n=N, v=V, k=K, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * sharp, -1)
    top_p, top_ids = p.topk(k, dim=-1)
    return p, top_ids, top_p.log()


def _dense_folded_fkl(p, top_ids, z, temperature=1.0):
    """Reference: fold both dense distributions into (top-k, tail) by summation, then KL."""
    q = torch.softmax(z.double() / temperature, -1)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top_ids, True)
    p_top = p.gather(-1, top_ids)
    if temperature != 1.0:
        p_top_t = p_top ** (1.0 / temperature)
        p_top = p_top_t / p_top_t.sum(-1, keepdim=True) * p_top.sum(-1, keepdim=True)
    p_tail = (p * ~in_top).sum(-1)
    q_top, q_tail = q.gather(-1, top_ids), (q * ~in_top).sum(-1)
    kl = (p_top * (p_top / q_top).log()).sum(-1) + torch.where(p_tail > 0, p_tail * (p_tail / q_tail).log(), 0.0)
    return kl * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_forward_kl_matches_dense_reference_values_and_grads(temperature):
    p, ids, lps = _teacher(0)
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    z_ref = z.detach().clone().requires_grad_(True)
    ours = forward_kl(z, ids, lps.float(), temperature)
    ref = _dense_folded_fkl(p, ids, z_ref, temperature)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-6)


def test_full_vocab_topk_equals_plain_dense_kl():
    p, ids, lps = _teacher(2, k=V)
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    ours = forward_kl(z, ids, lps)
    dense = (p * (p.log() - torch.log_softmax(z, -1))).sum(-1)
    torch.testing.assert_close(ours.double(), dense, rtol=1e-5, atol=1e-6)
    ours.sum().backward()  # an empty tail must not poison gradients with nan
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("seed", range(5))
def test_nonnegative_and_zero_at_teacher(seed):
    p, ids, lps = _teacher(seed, sharp=float(seed + 1))
    z_random = torch.randn(N, V, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64) * 4
    assert (forward_kl(z_random, ids, lps) >= 0).all()
    # A student whose logits are the teacher's log-probs is the teacher: KL is zero.
    at_teacher = forward_kl(p.log(), ids, lps)
    torch.testing.assert_close(at_teacher, torch.zeros(N, dtype=at_teacher.dtype), atol=1e-6, rtol=0)


def test_tail_mass_in_unit_interval():
    _, _, lps = _teacher(4)
    tail = teacher_tail_mass(lps)
    assert ((tail >= 0) & (tail <= 1)).all() and (tail > 0).any()


def test_ce_weight_mixes_kd_and_ce():
    p, ids, lps = _teacher(5)
    z = torch.randn(N, V, dtype=torch.float64)
    targets = ids[:, 0]
    total, kd, ce = distill_token_losses(z, targets, ids, lps, ce_weight=0.25)
    torch.testing.assert_close(ce.double(), -torch.log_softmax(z, -1).gather(-1, targets[:, None]).squeeze(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, 0.75 * kd + 0.25 * ce)


def test_chunked_sums_equal_unchunked_values_and_grads():
    torch.manual_seed(0)
    H = 16
    head = torch.nn.Linear(H, V, bias=False).double()
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    _, ids, lps = _teacher(6)
    targets = ids[:, 1]
    chunked = chunked_distill_loss_sums(hidden, head, targets, ids, lps, ce_weight=0.3, chunk_tokens=3)
    g_chunked = torch.autograd.grad(chunked[0], [hidden, head.weight])
    total, kd, ce = distill_token_losses(head(hidden), targets, ids, lps, ce_weight=0.3)
    g_full = torch.autograd.grad(total.sum(), [hidden, head.weight])
    for a, b in zip(chunked, (total.sum(), kd.sum(), ce.sum())):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# forward_kl(...).mean() for the fixed input of test_golden_value, as first computed.
GOLDEN_FKL = 1.261825442314148


def test_golden_value():
    """A fixed input and its loss, to catch silent changes in the formula."""
    p, ids, lps = _teacher(7)
    z = torch.linspace(-3, 3, N * V, dtype=torch.float64).reshape(N, V)
    value = forward_kl(z, ids, lps.float()).mean().item()
    assert value == pytest.approx(_dense_folded_fkl(p, ids, z).mean().item(), rel=1e-5)
    assert value == pytest.approx(GOLDEN_FKL, rel=1e-5)


