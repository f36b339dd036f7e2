"""KD losses against dense float64 references on a small vocabulary."""

import pytest
import torch

from raydistill.distill.losses import (
    LOSSES,
    chunked_distill_loss_sums,
    cross_entropy,
    distill_token_losses,
    forward_kl,
    loss_params,
    teacher_tail_mass,
)

V, N, K = 37, 11, 5


def _teacher(seed, n=N, v=V, k=K, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * sharp, -1)
    top_p, top_ids = p.topk(k, dim=-1)
    return p, top_ids, top_p.log()


def _dense_folded_fkl(p, top_ids, z, temperature=1.0):
    """Reference: fold both dense distributions into (top-k, tail) by summation, then KL."""
    p_f, q_f = _dense_folded(p, top_ids, z, temperature)
    return _ref_kl(p_f, q_f) * temperature**2


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
    for temperature in (1.0, 2.0):  # at T=1 CE shares the KD term's logsumexp; otherwise it has its own
        z_ours = z.clone().requires_grad_(True)
        z_ref = z.clone().requires_grad_(True)
        total, kd, ce = distill_token_losses(z_ours, targets, ids, lps, ce_weight=0.25, temperature=temperature)
        ref_ce = -torch.log_softmax(z_ref, -1).gather(-1, targets[:, None]).squeeze(-1)
        torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(total, 0.75 * kd + 0.25 * ce)
        ref_total = 0.75 * _dense_folded_fkl(p, ids, z_ref, temperature) + 0.25 * ref_ce
        total.sum().backward()
        ref_total.sum().backward()
        torch.testing.assert_close(z_ours.grad, z_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "chunk_tokens, always_recompute",
    [(3, False), (N, False), (10 * N, False), (10 * N, True)],
    ids=["several-chunks", "exactly-one", "one-small", "one-recomputed"],
)
def test_chunked_sums_equal_unchunked_values_and_grads(chunk_tokens, always_recompute):
    torch.manual_seed(0)
    H = 16
    head = torch.nn.Linear(H, V, bias=False).double()
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    _, ids, lps = _teacher(6)
    targets = ids[:, 1]
    chunked = chunked_distill_loss_sums(hidden, head, targets, ids, lps, ce_weight=0.3, chunk_tokens=chunk_tokens,
                                       always_recompute=always_recompute)
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




# --------------------------------------------------------------------------- the loss family


def _dense_folded(p, top_ids, z, temperature=1.0):
    """Reference folding in float64: dense p and q summed into (top-k, tail), [N, K+1] each."""
    q = torch.softmax(z.double() / temperature, -1)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top_ids, True)
    p_top = p.gather(-1, top_ids)
    if temperature != 1.0:
        p_top_t = p_top ** (1.0 / temperature)
        p_top = p_top_t / p_top_t.sum(-1, keepdim=True) * p_top.sum(-1, keepdim=True)
    p_f = torch.cat([p_top, (p * ~in_top).sum(-1, keepdim=True)], -1)
    q_f = torch.cat([q.gather(-1, top_ids), (q * ~in_top).sum(-1, keepdim=True)], -1)
    return p_f, q_f


def _ref_kl(a, b):
    return torch.where(a > 0, a * (a / b).log(), 0.0).sum(-1)


def _ref_jsd(p, q, beta):
    m = beta * p + (1 - beta) * q
    return beta * _ref_kl(p, m) + (1 - beta) * _ref_kl(q, m)


# name -> (params, dense reference over folded (p, q)); the references use plain float64 formulas.
REFERENCES = {
    "forward_kl": ({}, lambda p, q: _ref_kl(p, q)),
    "reverse_kl": ({}, lambda p, q: _ref_kl(q, p)),
    "jsd": ({"beta": 0.3}, lambda p, q: _ref_jsd(p, q, 0.3)),
    "skew_forward_kl": ({"alpha": 0.2}, lambda p, q: _ref_kl(p, 0.2 * p + 0.8 * q)),
    "skew_reverse_kl": ({"alpha": 0.2}, lambda p, q: _ref_kl(q, 0.2 * q + 0.8 * p)),
    "tvd": ({}, lambda p, q: 0.5 * (p - q).abs().sum(-1)),
}


def _dense_reference(name, p, ids, z, temperature=1.0):
    _, ref = REFERENCES[name]
    return ref(*_dense_folded(p, ids, z, temperature)) * temperature**2


def test_registry_names():
    assert set(LOSSES) == set(REFERENCES) == {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_matches_dense_reference_values_and_grads(name, temperature):
    params, _ = REFERENCES[name]
    p, ids, lps = _teacher(10)
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    z_ref = z.detach().clone().requires_grad_(True)
    ours = LOSSES[name](z, ids, lps.float(), temperature, **params)
    assert ours.dtype == torch.float32 and ours.shape == (N,)
    ref = _dense_reference(name, p, ids, z_ref, temperature)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_confident_student_rows_match_dense_reference(name):
    """Rows where the student puts nearly all its mass on the teacher's top-k (tails from 1e-1 down
    to 1e-9) take the masked-logsumexp tail; the rest the cheap one. Both must match the reference."""
    params, _ = REFERENCES[name]
    p, ids, lps = _teacher(12)
    z0 = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    boost = torch.linspace(0.0, 25.0, N, dtype=torch.float64)[:, None]  # row i: top-k logits raised by boost[i]
    z0 = z0.scatter_add(-1, ids, boost.expand(N, K).contiguous())
    q_tail = 1 - torch.softmax(z0, -1).gather(-1, ids).sum(-1)
    assert (q_tail < 1e-2).sum() >= 3 and (q_tail > 1e-2).sum() >= 3, q_tail  # both paths are exercised
    z = z0.clone().requires_grad_(True)
    z_ref = z0.clone().requires_grad_(True)
    ours = LOSSES[name](z, ids, lps.float(), 1.0, **params)
    ref = _dense_reference(name, p, ids, z_ref)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(z.grad).all()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta_values(beta):
    p, ids, lps = _teacher(12)
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    ours = LOSSES["jsd"](z, ids, lps.float(), beta=beta)
    torch.testing.assert_close(ours.double(), _ref_jsd(*_dense_folded(p, ids, z), beta), rtol=1e-5, atol=1e-6)
    if beta == 0.5:
        assert (ours <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_skew_alpha_zero_is_plain_kl():
    _, ids, lps = _teacher(14)
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    torch.testing.assert_close(LOSSES["skew_forward_kl"](z, ids, lps, alpha=0.0), LOSSES["forward_kl"](z, ids, lps))
    torch.testing.assert_close(LOSSES["skew_reverse_kl"](z, ids, lps, alpha=0.0), LOSSES["reverse_kl"](z, ids, lps))


@pytest.mark.parametrize(("name", "bad"), [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skew_forward_kl", {"alpha": 1.0}), ("skew_reverse_kl", {"alpha": -0.1})])
def test_out_of_range_weights_rejected(name, bad):
    _, ids, lps = _teacher(16)
    with pytest.raises(ValueError, match=next(iter(bad))):
        LOSSES[name](torch.zeros(N, V), ids, lps, **bad)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_every_loss_nonnegative_and_zero_at_teacher(name, seed):
    params, _ = REFERENCES[name]
    p, ids, lps = _teacher(seed, sharp=float(seed + 1))
    for scale in (0.5, 4.0, 20.0):
        z_random = torch.randn(N, V, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64) * scale
        for temperature in (1.0, 2.0):
            assert (LOSSES[name](z_random, ids, lps, temperature, **params) >= 0).all()
    # A student whose logits are the teacher's log-probs is the teacher: every divergence is zero.
    at_teacher = LOSSES[name](p.log(), ids, lps, **params)
    torch.testing.assert_close(at_teacher, torch.zeros(N, dtype=at_teacher.dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_empty_tail_is_finite(name, temperature):
    """K == V: both tails are empty; values and gradients must stay finite (no log 0, no 0 * inf)."""
    params, _ = REFERENCES[name]
    p, ids, lps = _teacher(17, k=V)
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(18), requires_grad=True)
    value = LOSSES[name](z, ids, lps.float(), temperature, **params)
    assert torch.isfinite(value).all() and (value >= 0).all()
    value.sum().backward()
    assert torch.isfinite(z.grad).all()
    # At T=1 the folded distributions are the dense ones (plus an empty tail).
    if temperature == 1.0:
        ref = REFERENCES[name][1](p, torch.softmax(z.detach(), -1))
        torch.testing.assert_close(value.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_params_pass_through_token_and_chunked_sums(name):
    params, _ = REFERENCES[name]
    torch.manual_seed(0)
    H = 16
    head = torch.nn.Linear(H, V, bias=False).double()
    hidden = torch.randn(N, H, dtype=torch.float64)
    _, ids, lps = _teacher(19)
    targets = ids[:, 0]
    total, kd, _ = distill_token_losses(head(hidden), targets, ids, lps, name, 0.2, 1.5, loss_params=params)
    torch.testing.assert_close(kd, LOSSES[name](head(hidden), ids, lps, 1.5, **params))
    chunked = chunked_distill_loss_sums(hidden, head, targets, ids, lps, name, 0.2, 1.5, chunk_tokens=4, loss_params=params)
    torch.testing.assert_close(chunked[0].double(), total.sum().double(), rtol=1e-5, atol=1e-6)


def test_loss_params_from_distill_spec():
    from raydistill.spec import DistillSpec

    assert loss_params(DistillSpec()) == {}
    assert loss_params(DistillSpec(loss="jsd", jsd_beta=0.25)) == {"beta": 0.25}
    assert loss_params(DistillSpec(loss="skew_forward_kl", skew_alpha=0.3)) == {"alpha": 0.3}
    assert loss_params(DistillSpec(loss="skew_reverse_kl")) == {"alpha": 0.1}
    assert loss_params(DistillSpec(loss="tvd")) == {}


# LOSSES[name](z, ids, lps.float(), **params).mean() for the fixed input of test_family_golden_values,
# computed once by this implementation; the same test cross-checks each against the dense float64 reference.
GOLDEN = {
    "forward_kl": 1.261825442314148,
    "reverse_kl": 1.0074989795684814,
    "jsd": 0.21175219118595123,
    "skew_forward_kl": 0.602597177028656,
    "skew_reverse_kl": 0.595651388168335,
    "tvd": 0.6229732632637024,
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_family_golden_values(name):
    params, _ = REFERENCES[name]
    p, ids, lps = _teacher(7)
    z = torch.linspace(-3, 3, N * V, dtype=torch.float64).reshape(N, V)
    value = LOSSES[name](z, ids, lps.float(), **params).mean().item()
    assert value == pytest.approx(_dense_reference(name, p, ids, z).mean().item(), rel=1e-5)
    assert value == pytest.approx(GOLDEN[name], rel=1e-5)


class _HeadNotLinear(torch.nn.Module):
    """An LM head that is not an nn.Linear: the chunked loss must checkpoint it instead of fusing."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, h):
        return self.linear(h)


@pytest.mark.parametrize("bias,frozen_head", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_chunked_paths_match_the_dense_loss_in_value_and_gradient(name, bias, frozen_head):
    """Fused (gradients in the forward), checkpointed (ZeRO-3) and other-head paths against one dense pass."""
    params, _ = REFERENCES[name]
    torch.manual_seed(1)
    H = 16
    head = torch.nn.Linear(H, V, bias=bias).double()
    head.requires_grad_(not frozen_head)
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    _, ids, lps = _teacher(23)
    targets = ids[:, 1]
    results = {}
    for path in ("dense", "fused", "checkpointed", "other_head"):
        hidden.grad = None
        head.zero_grad()
        if path == "dense":
            total = distill_token_losses(head(hidden), targets, ids, lps, name, 0.3, 1.5, loss_params=params)[0].sum()
            kd = distill_token_losses(head(hidden), targets, ids, lps, name, 0.3, 1.5, loss_params=params)[1].sum()
        else:
            module = _HeadNotLinear(head) if path == "other_head" else head
            total, kd, _ = chunked_distill_loss_sums(hidden, module, targets, ids, lps, name, 0.3, 1.5, chunk_tokens=3,
                                                     loss_params=params, always_recompute=path == "checkpointed")
            assert not kd.requires_grad or path != "fused"
        (0.7 * total).backward()
        grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters() if p.requires_grad]
        results[path] = (float(total), float(kd), grads)
    dense = results.pop("dense")
    for path, (total, kd, grads) in results.items():
        assert total == pytest.approx(dense[0], rel=1e-5, abs=1e-6), path
        assert kd == pytest.approx(dense[1], rel=1e-5, abs=1e-6), path
        assert len(grads) == len(dense[2]) == (1 if frozen_head else 2 + bias)
        for g, ref in zip(grads, dense[2]):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7, msg=path)
