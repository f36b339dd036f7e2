"""The on-policy losses: the sampled reverse-KL estimator and the folded reverse KL, against dense float64 references."""

import pytest
import torch

from raydistill.distill.losses import chunked_distill_loss_sums, distill_token_losses, reverse_kl, sampled_reverse_kl

V, N, K = 29, 4000, 6


def _pair(seed, n=N, v=V, sharp=1.5):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * sharp, -1)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * sharp
    return p, z


def _dense_reverse_kl(q_logits, p):
    log_q = torch.log_softmax(q_logits, -1)
    return (log_q.exp() * (log_q - p.log())).sum(-1)


@pytest.mark.parametrize("estimator", ["pg", "k3"])
def test_sampled_estimate_and_gradient_match_the_dense_reverse_kl(estimator):
    """Averaged over many x ~ q, the value is KL(q||p) and the gradient is grad KL(q||p) (float64 dense reference)."""
    p, z = _pair(0, n=1)
    z = z.expand(200_000, V).clone().requires_grad_(True)
    q = torch.softmax(z.detach(), -1)
    x = torch.multinomial(q[0], z.shape[0], replacement=True, generator=torch.Generator().manual_seed(1))
    ours = sampled_reverse_kl(z, x, p[0].log()[x], estimator=estimator)
    z_ref = z.detach()[:1].clone().requires_grad_(True)
    ref = _dense_reverse_kl(z_ref, p)
    torch.testing.assert_close(ours.double().mean(), ref[0], atol=2e-2, rtol=2e-2)
    ours.mean().backward()
    ref.sum().backward()
    grad = z.grad.sum(0)  # each row is one sample of the same state
    if estimator == "pg":  # the score-function gradient is unbiased for grad KL(q||p)
        torch.testing.assert_close(grad, z_ref.grad[0], atol=2e-2, rtol=0)
    else:  # k3's direct gradient is its own (biased) surrogate; only check it descends toward p
        assert torch.dot(grad, z_ref.grad[0]) > 0


def test_sampled_pg_value_is_k1_exactly():
    p, z = _pair(2, n=64)
    x = torch.multinomial(torch.softmax(z, -1), 1, generator=torch.Generator().manual_seed(3)).squeeze(-1)
    log_q_x = torch.log_softmax(z, -1).gather(-1, x[:, None]).squeeze(-1)
    log_p_x = p.log().gather(-1, x[:, None]).squeeze(-1)
    torch.testing.assert_close(sampled_reverse_kl(z, x, log_p_x).double(), log_q_x - log_p_x, rtol=1e-5, atol=1e-6)
    k3 = sampled_reverse_kl(z, x, log_p_x, estimator="k3")
    assert (k3 >= 0).all()


def test_token_losses_use_target_logprob_on_samples_and_top_k_reverse_kl_without():
    p, z = _pair(4, n=32)
    lps, ids = p.float().log().topk(K, dim=-1)
    x = torch.multinomial(torch.softmax(z, -1), 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
    tl = p.log().gather(-1, x[:, None]).squeeze(-1).float()
    params = {"estimator": "pg"}
    _, kd, _ = distill_token_losses(z.float(), x, ids, lps, "sampled_reverse_kl", 0.0, 1.0, params, tl)
    torch.testing.assert_close(kd, sampled_reverse_kl(z.float(), x, tl))
    _, kd_off, _ = distill_token_losses(z.float(), x, ids, lps, "sampled_reverse_kl", 0.0, 1.0, params)
    torch.testing.assert_close(kd_off, reverse_kl(z.float(), ids, lps))


@pytest.mark.parametrize("chunk_tokens,always_recompute", [(64, False), (5, False), (5, True)])
def test_chunked_sampled_sums_equal_unchunked_values_and_grads(chunk_tokens, always_recompute):
    g = torch.Generator().manual_seed(6)
    n, h = 23, 8
    head = torch.nn.Linear(h, V, bias=False)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    x = torch.randint(0, V, (n,), generator=g)
    p, _ = _pair(7, n=n)
    lps, ids = p.float().log().topk(K, dim=-1)
    tl = p.log().gather(-1, x[:, None]).squeeze(-1).float()
    kwargs = dict(loss="sampled_reverse_kl", ce_weight=0.2, loss_params={"estimator": "pg"}, target_logprob=tl)
    total, kd, ce = chunked_distill_loss_sums(hidden, head, x, ids, lps, chunk_tokens=chunk_tokens, always_recompute=always_recompute, **kwargs)
    total.backward()
    g_h, g_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    ref_total, ref_kd, ref_ce = distill_token_losses(head(hidden), x, ids, lps, "sampled_reverse_kl", 0.2, 1.0, {"estimator": "pg"}, tl)
    ref_total.sum().backward()
    torch.testing.assert_close(torch.stack([total, kd, ce]), torch.stack([ref_total.sum(), ref_kd.sum(), ref_ce.sum()]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, head.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, V - 1])
def test_folded_top_k_reverse_kl_never_exceeds_the_dense_reverse_kl(seed, k):
    """Folding both distributions into (top-k, tail) is a coarse-graining: KL can only shrink (data processing)."""
    p, z = _pair(10 + seed, n=256, sharp=float(seed % 3 + 1))
    # float64 teacher log-probs: the tail 1 - sum(top-k) of a confident teacher at k = V - 1 is
    # ~1e-9, below float32's resolution of that difference (the stored signals' own limit).
    lps, ids = p.log().topk(k, dim=-1)
    folded = reverse_kl(z.float(), ids, lps).double()
    dense = _dense_reverse_kl(z, p)
    # The student side runs in float32: allow its rounding, nothing more.
    assert (folded <= dense + 1e-4 + 1e-5 * dense).all(), (folded - dense).max()
    if k < 3:
        assert folded.mean() < 0.99 * dense.mean()  # a coarse fold really loses information
