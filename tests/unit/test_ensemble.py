"""Several teachers: the weighted top-k mixture (raydistill.teacher.ensemble), masked entries in
the losses and collation, and the second tiny teacher."""

from pathlib import Path

import numpy as np
import pytest
import torch

from raydistill.data.collate import collate, collate_rowwise
from raydistill.distill.losses import LOSSES, chunked_distill_loss_sums, distill_token_losses
from raydistill.teacher.ensemble import MASK_ID, mix_logprobs, mix_topk, normalize_weights, unseen_union_mass_bound

P, V = 13, 29


def _dense_teachers(seed, n, p=P, v=V, sharp=2.0):
    """n dense float64 teachers [n, P, V], peaked enough that top-k lists differ but overlap."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, p, v)) * sharp
    dense = np.exp(logits - logits.max(-1, keepdims=True))
    return dense / dense.sum(-1, keepdims=True)


def _topk(dense, k):
    """[P, V] -> (ids [P, k], log-probs [P, k]), most likely first."""
    ids = np.argsort(-dense, axis=-1, kind="stable")[:, :k]
    return ids, np.log(np.take_along_axis(dense, ids, -1))


def _densify(ids, lps, v=V):
    """Masked sparse [P, W] -> dense [P, V] probabilities (0 off the list), float64."""
    out = np.zeros((ids.shape[0], v))
    rows, cols = np.nonzero(ids >= 0)
    np.add.at(out, (rows, ids[rows, cols]), np.exp(lps[rows, cols].astype(np.float64)))
    return out


def _check_layout(ids, lps):
    """Valid entries first, sorted by probability; padding is id -1 / log-prob -inf; no id twice."""
    valid = ids >= 0
    assert (valid[:, :-1] >= valid[:, 1:]).all()
    assert (ids[~valid] == MASK_ID).all() and np.isneginf(lps[~valid]).all()
    filled = np.where(valid, lps, -1e300)  # finite, so padding minus padding is not nan
    assert (np.diff(filled, axis=1)[valid[:, 1:]] <= 0).all()
    by_id = np.sort(ids, axis=1)
    assert not ((by_id[:, 1:] == by_id[:, :-1]) & (by_id[:, 1:] >= 0)).any()


def test_weights_are_normalised_and_must_be_positive():
    np.testing.assert_allclose(normalize_weights([2, 6]), [0.25, 0.75])
    for bad in ([1.0, 0.0], [1.0, -2.0], [np.nan], [np.inf, 1.0], []):
        with pytest.raises(ValueError, match="weight"):
            normalize_weights(bad)


def test_full_vocabulary_mixture_equals_dense_mixture():
    dense = _dense_teachers(0, 3)
    w = np.array([0.2, 0.5, 0.3])
    tops = [_topk(d, V) for d in dense]
    ids, lps = mix_topk([t[0] for t in tops], [t[1] for t in tops], w)
    assert ids.shape == lps.shape == (P, 3 * V)
    assert ((ids >= 0).sum(1) == V).all()
    _check_layout(ids, lps)
    np.testing.assert_allclose(_densify(ids, lps), np.einsum("i,ipv->pv", w, dense), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(1.0 - np.exp(lps).sum(1), 0.0, atol=1e-12)  # no tail left


def test_tail_is_weighted_teacher_tails_and_bounds_the_mass_outside_the_union():
    dense = _dense_teachers(1, 3, sharp=1.0)
    ks, weights = [4, 7, 5], [1.0, 2.0, 3.0]
    w = normalize_weights(weights)
    tops = [_topk(d, k) for d, k in zip(dense, ks)]
    ids, lps = mix_topk([t[0] for t in tops], [t[1] for t in tops], weights)
    _check_layout(ids, lps)
    assert ids.shape == (P, sum(ks))

    in_top = np.zeros((3, P, V), bool)
    for i, (t_ids, _) in enumerate(tops):
        np.put_along_axis(in_top[i], t_ids, True, -1)
    in_union = in_top.any(0)
    assert ((ids >= 0).sum(1) == in_union.sum(1)).all()
    # p(v) sums each teacher's probability over the teachers that list v, and nothing else.
    np.testing.assert_allclose(_densify(ids, lps), np.einsum("i,ipv->pv", w, dense * in_top), rtol=1e-6, atol=1e-12)

    stored_tail = 1.0 - np.exp(lps.astype(np.float64)).sum(1)
    teacher_tails = 1.0 - (dense * in_top).sum(-1)  # [3, P]
    np.testing.assert_allclose(stored_tail, w @ teacher_tails, atol=1e-6)
    outside_union = np.einsum("i,ipv->p", w, dense * ~in_union)
    unseen = np.einsum("i,ipv->p", w, dense * (in_union & ~in_top))  # union tokens a teacher did not list
    assert (unseen > 0).any()  # the lists differ, so the bound is exercised
    np.testing.assert_allclose(stored_tail, outside_union + unseen, atol=1e-6)
    bound = unseen_union_mass_bound([t[0] for t in tops], [t[1] for t in tops], weights, ids)
    assert (unseen <= bound + 1e-12).all() and (bound <= w @ teacher_tails + 1e-12).all()


def test_two_identical_teachers_reproduce_the_single_teacher_exactly():
    dense = _dense_teachers(2, 1, sharp=20.0)[0]  # peaked: top-1 log-probs near 0, the hard case for rounding
    t_ids, t_lps = _topk(dense, 6)
    t_ids, t_lps = t_ids.astype(np.int32), t_lps.astype(np.float32)
    assert (t_lps[:, 0] > -1e-3).any()
    ids, lps = mix_topk([t_ids, t_ids], [t_lps, t_lps], [0.5, 0.5])
    assert ids.dtype == np.int32 and lps.dtype == np.float32
    np.testing.assert_array_equal(ids[:, :6], t_ids)
    np.testing.assert_array_equal(lps[:, :6], t_lps)
    assert (ids[:, 6:] == MASK_ID).all() and np.isneginf(lps[:, 6:]).all()
    np.testing.assert_array_equal(mix_logprobs([t_lps[:, 0], t_lps[:, 0]], [0.5, 0.5]), t_lps[:, 0].astype(np.float64))


def test_mixing_mixtures_and_exact_target_logprobs():
    dense = _dense_teachers(3, 3)
    tops = [_topk(d, 5) for d in dense]
    ab = mix_topk([tops[0][0], tops[1][0]], [tops[0][1], tops[1][1]], [1, 1])
    nested = mix_topk([ab[0], tops[2][0]], [ab[1], tops[2][1]], [2, 1])  # masked entries as input
    flat = mix_topk([t[0] for t in tops], [t[1] for t in tops], [1, 1, 1])
    _check_layout(*nested)
    np.testing.assert_allclose(_densify(*nested), _densify(*flat), rtol=1e-12, atol=1e-15)
    target = np.arange(P) % V
    target_lps = [np.log(d[np.arange(P), target]) for d in dense]
    np.testing.assert_allclose(np.exp(mix_logprobs(target_lps, [1, 2, 1])), dense[:, np.arange(P), target].T @ [0.25, 0.5, 0.25])
    assert np.isnan(mix_logprobs([np.array([np.nan]), np.array([-1.0])], [1, 1])).all()
    assert np.isneginf(mix_logprobs([np.array([-np.inf]), np.array([-np.inf])], [1, 1])).all()


def test_empty_inputs_and_shape_errors():
    ids, lps = mix_topk([np.zeros((0, 3), np.int32), np.zeros((0, 2), np.int32)], [np.zeros((0, 3)), np.zeros((0, 2))], [1, 1])
    assert ids.shape == lps.shape == (0, 5)
    with pytest.raises(ValueError, match="teacher 1"):
        mix_topk([np.zeros((2, 3), np.int32), np.zeros((3, 3), np.int32)], [np.zeros((2, 3)), np.zeros((3, 3))], [1, 1])


# --------------------------------------------------------------------------- masked entries in the losses

N, K = 11, 5


def _dense_folded(p, ids, z, temperature):
    """Dense float64 p [N, V] and logits z folded into (top-k, tail) over the *valid* ``ids``."""
    q = torch.softmax(z.double() / temperature, -1)
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    p_top = p.gather(-1, ids)
    if temperature != 1.0:
        p_top_t = p_top ** (1.0 / temperature)
        p_top = p_top_t / p_top_t.sum(-1, keepdim=True) * p_top.sum(-1, keepdim=True)
    return torch.cat([p_top, (p * ~in_top).sum(-1, keepdim=True)], -1), torch.cat([q.gather(-1, ids), (q * ~in_top).sum(-1, keepdim=True)], -1)


def _ref_kl(a, b):
    return torch.where(a > 0, a * (a / b).log(), 0.0).sum(-1)


REFERENCES = {
    "forward_kl": ({}, lambda p, q: _ref_kl(p, q)),
    "reverse_kl": ({}, lambda p, q: _ref_kl(q, p)),
    "jsd": ({"beta": 0.3}, lambda p, q: 0.3 * _ref_kl(p, 0.3 * p + 0.7 * q) + 0.7 * _ref_kl(q, 0.3 * p + 0.7 * q)),
    "skew_forward_kl": ({"alpha": 0.2}, lambda p, q: _ref_kl(p, 0.2 * p + 0.8 * q)),
    "skew_reverse_kl": ({"alpha": 0.2}, lambda p, q: _ref_kl(q, 0.2 * q + 0.8 * p)),
    "tvd": ({}, lambda p, q: 0.5 * (p - q).abs().sum(-1)),
}


def _padded_case(seed):
    """A teacher's top-K (unpadded), the same entries scattered among masked ones (padded, width 2K+1),
    and student logits whose rows range from a spread-out to a very confident one (so both of the
    student-tail paths, cheap and exact, see masked ids)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2.0, -1)
    top_p, ids = p.topk(K, dim=-1)
    lps = top_p.log().float()
    width = 2 * K + 1
    cols = torch.rand(N, width, generator=g).argsort(-1)[:, :K].sort(-1).values  # where the real entries go
    pad_ids = torch.full((N, width), MASK_ID, dtype=torch.int64).scatter(-1, cols, ids)
    pad_lps = torch.full((N, width), -float("inf")).scatter(-1, cols, lps)
    pad_lps[:, -1] = torch.where(pad_ids[:, -1] < 0, 0.0, pad_lps[:, -1])  # a masked log-prob that is not -inf is ignored too
    z = torch.randn(N, V, generator=g, dtype=torch.float64).scatter_add(-1, ids, torch.linspace(0, 25, N, dtype=torch.float64)[:, None].expand(N, K).contiguous())
    q_tail = 1 - torch.softmax(z, -1).gather(-1, ids).sum(-1)
    assert (q_tail < 1e-2).sum() >= 3 and (q_tail > 1e-2).sum() >= 3
    return p, ids, lps, pad_ids, pad_lps, z


def _value_and_grad(fn, z, *args, **kw):
    z = z.clone().requires_grad_(True)
    value = fn(z, *args, **kw)
    (grad,) = torch.autograd.grad(value.sum(), z)
    return value.detach().double(), grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_masked_entries_contribute_nothing_to_loss_or_gradient(name, temperature):
    params, ref_fn = REFERENCES[name]
    p, ids, lps, pad_ids, pad_lps, z = _padded_case(20)
    plain, g_plain = _value_and_grad(LOSSES[name], z, ids, lps, temperature, **params)
    padded, g_padded = _value_and_grad(LOSSES[name], z, pad_ids, pad_lps, temperature, **params)
    assert torch.isfinite(padded).all() and torch.isfinite(g_padded).all()
    # Equal up to float32 summation order (the sums run over more, zero, entries).
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_padded, g_plain, rtol=1e-5, atol=1e-6)
    ref, g_ref = _value_and_grad(lambda zz: ref_fn(*_dense_folded(p, ids, zz, temperature)) * temperature**2, z)
    torch.testing.assert_close(padded, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_padded, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss", sorted(REFERENCES) + ["sampled_reverse_kl"])
def test_masked_entries_in_token_losses_and_chunked_sums(loss):
    """The training entry points: KD + CE per token (sampled_reverse_kl without target log-probs
    falls back to the top-k reverse KL) and the chunked/fused sums over an LM head."""
    _, ids, lps, pad_ids, pad_lps, _ = _padded_case(21)
    targets = ids[:, 1]
    params = REFERENCES.get(loss, ({},))[0]
    torch.manual_seed(0)
    head = torch.nn.Linear(8, V, bias=False).double()
    hidden = torch.randn(N, 8, dtype=torch.float64)
    for chunk_tokens in (4, 100):
        sums, grads = [], []
        for a, b in ((ids, lps), (pad_ids, pad_lps)):
            h = hidden.clone().requires_grad_(True)
            out = chunked_distill_loss_sums(h, head, targets, a, b, loss=loss, ce_weight=0.3, chunk_tokens=chunk_tokens, loss_params=params)
            sums.append(torch.stack(out).double())
            grads.append(torch.autograd.grad(out[0], [h, head.weight]))
        torch.testing.assert_close(sums[1], sums[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    total, kd, ce = distill_token_losses(head(hidden), targets, pad_ids, pad_lps, loss, 0.3, 1.0, params)
    assert torch.isfinite(total).all()


def test_a_fully_masked_row_is_all_tail():
    """No teacher entry at all: the teacher's mass is all tail, the student's too: every loss is 0."""
    z = torch.randn(2, V, dtype=torch.float64, requires_grad=True)
    ids = torch.full((2, 3), MASK_ID)
    lps = torch.full((2, 3), -float("inf"))
    for name, (params, _) in REFERENCES.items():
        for temperature in (1.0, 0.5):
            value = LOSSES[name](z, ids, lps, temperature, **params)
            (grad,) = torch.autograd.grad(value.sum(), z)
            assert torch.isfinite(value).all() and torch.isfinite(grad).all(), name
            torch.testing.assert_close(value.double(), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_identical_teachers_mixture_trains_like_the_single_teacher():
    """Through collation (which drops the all-padding columns) to the loss."""
    dense = _dense_teachers(4, 1)[0]
    t_ids, t_lps = _topk(dense, 4)
    t_ids, t_lps = t_ids.astype(np.int32), t_lps.astype(np.float32)
    m_ids, m_lps = mix_topk([t_ids, t_ids], [t_lps, t_lps], [0.5, 0.5])

    def rows(ids, lps):
        return {"input_ids": [np.arange(P + 1, dtype=np.int32)], "target_start": [1], "topk_ids": [list(ids)], "topk_logprobs": [list(lps)]}

    single = collate(rows(t_ids, t_lps), 64, 0)
    mixed = collate(rows(m_ids, m_lps), 64, 0)
    for key in single:
        np.testing.assert_array_equal(mixed[key], single[key])


def test_collate_carries_masked_entries_and_drops_all_padding_columns():
    a = _dense_teachers(5, 1)[0]
    b = a * np.exp(np.random.default_rng(6).normal(size=a.shape) * 0.5)  # a similar teacher: lists overlap
    tops = [_topk(d / d.sum(-1, keepdims=True), 3) for d in (a, b)]
    ids, lps = mix_topk([t[0].astype(np.int32) for t in tops], [t[1].astype(np.float32) for t in tops], [1, 1])
    widest = int((ids >= 0).sum(1).max())
    assert widest < ids.shape[1]
    rows = {"input_ids": [np.arange(6, dtype=np.int32), np.arange(10, dtype=np.int32)], "target_start": [1, 2],
            "topk_ids": [list(ids[:5]), list(ids[5:])], "topk_logprobs": [list(lps[:5]), list(lps[5:])]}
    batch = collate(rows, 64, 0)
    reference = collate_rowwise(rows, 64, 0)
    for key in batch:
        np.testing.assert_array_equal(batch[key], reference[key])
    assert batch["topk_ids"].shape == batch["topk_logprobs"].shape == (P, widest)
    np.testing.assert_array_equal(batch["topk_ids"], ids[:, :widest])
    np.testing.assert_array_equal(batch["topk_logprobs"], lps[:, :widest])


# --------------------------------------------------------------------------- the second tiny teacher


def test_tiny_teacher2_shares_the_tokenizer_not_the_weights(tmp_path, monkeypatch):
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    from raydistill.data.signals import tokenizer_fingerprint
    from raydistill.models import resolve_model

    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path))
    first = resolve_model("tiny:teacher")
    before = sorted((f.name, f.stat().st_mtime_ns) for f in Path(first).iterdir())
    second = resolve_model("tiny:teacher2")  # added to a cache that has the teacher already
    assert second != first
    assert sorted((f.name, f.stat().st_mtime_ns) for f in Path(first).iterdir()) == before
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(first)) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(second))
    c1, c2 = AutoConfig.from_pretrained(first).to_dict(), AutoConfig.from_pretrained(second).to_dict()
    assert {k: v for k, v in c1.items() if k != "_name_or_path"} == {k: v for k, v in c2.items() if k != "_name_or_path"}
    w1, w2 = load_file(f"{first}/model.safetensors"), load_file(f"{second}/model.safetensors")
    assert w1.keys() == w2.keys() and all(w1[k].shape == w2[k].shape for k in w1)
    assert not np.allclose(w1["lm_head.weight"], w2["lm_head.weight"])
