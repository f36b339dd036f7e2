"""The adaptive loop's policies on their own: DDK re-weighting, hard-row selection, budgets and balanced draws."""

import math

import numpy as np
import pytest

from raydistill.loop.policies import allocate, balanced_sample, ddk_update, disagreement_rate, select_hard


def test_ddk_moves_weight_toward_the_larger_gap_by_the_formula():
    w = ddk_update({"code": 0.5, "chat": 0.5}, {"code": 2.0, "chat": 0.5}, beta=0.5, tau=1.0)
    soft = np.exp([0.5, 2.0]) / np.exp([0.5, 2.0]).sum()  # sorted domains: chat, code
    assert w["chat"] == pytest.approx(0.5 * 0.5 + 0.5 * soft[0]) and w["code"] == pytest.approx(0.5 * 0.5 + 0.5 * soft[1])
    assert w["code"] > 0.5 > w["chat"] and sum(w.values()) == pytest.approx(1.0)
    # Repeated rounds with the same gaps converge to softmax(gap / tau).
    for _ in range(60):
        w = ddk_update(w, {"code": 2.0, "chat": 0.5}, beta=0.5, tau=1.0)
    assert w["code"] == pytest.approx(soft[1], abs=1e-9)


def test_ddk_edge_cases():
    assert ddk_update({}, {"only": 3.0}, beta=0.3, tau=0.5) == {"only": 1.0}  # one domain: all of it
    same = ddk_update({"a": 0.9, "b": 0.1}, {"a": 0.0, "b": 0.0}, beta=1.0, tau=1.0)
    assert same == pytest.approx({"a": 0.5, "b": 0.5})  # zero gaps everywhere: uniform target
    zero = ddk_update({"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 4.0}, beta=1.0, tau=1.0)
    assert 0 < zero["a"] < zero["b"]  # a zero gap gets the smallest share, not none
    assert ddk_update({"a": 0.2, "b": 0.8}, {"a": 1.0, "b": 5.0}, beta=0.0, tau=1.0) == pytest.approx({"a": 0.2, "b": 0.8})
    new = ddk_update({"a": 1.0}, {"a": 1.0, "b": 1.0}, beta=0.0, tau=1.0)  # a new domain starts from the uniform share
    assert new == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    for kwargs, match in (({"beta": 1.5, "tau": 1.0}, "beta"), ({"beta": 0.5, "tau": 0.0}, "temperature")):
        with pytest.raises(ValueError, match=match):
            ddk_update({}, {"a": 1.0}, **kwargs)
    with pytest.raises(ValueError, match="at least one domain"):
        ddk_update({"a": 1.0}, {}, beta=0.5, tau=1.0)
    with pytest.raises(ValueError, match="finite"):
        ddk_update({}, {"a": math.inf}, beta=0.5, tau=1.0)


def test_select_hard_takes_the_highest_scores_ties_by_id_and_skips_rows_without_targets():
    ids = ["r3", "r1", "r2", "r4", "r5"]
    scores = [0.5, 2.0, 0.5, float("nan"), 1.0]
    assert select_hard(ids, scores, 0.5) == ["r1", "r5"]  # ceil(0.5 * 4 scored rows)
    assert select_hard(ids, scores, 0.75) == ["r1", "r5", "r2"]  # r2 before r3: the tie goes to the smaller id
    assert select_hard(ids, scores, 0.01) == ["r1"]  # any positive fraction replays one
    assert select_hard(ids, scores, 0.0) == [] and select_hard([], [], 0.5) == []  # empty selections
    with pytest.raises(ValueError, match="fraction"):
        select_hard(ids, scores, 1.5)
    with pytest.raises(ValueError, match="scores"):
        select_hard(ids, scores[:2], 0.5)


def test_disagreement_rate():
    assert disagreement_rate(np.array([1, 2, 3, 4]), np.array([1, 9, 3, 9])) == 0.5
    assert math.isnan(disagreement_rate(np.array([], int), np.array([], int)))
    with pytest.raises(ValueError, match="shapes"):
        disagreement_rate(np.array([1]), np.array([1, 2]))


def test_allocate_is_proportional_and_sums_exactly():
    assert allocate({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}  # the remainder to the earlier name on a tie
    assert allocate({"a": 0.7, "b": 0.3}, 10) == {"a": 7, "b": 3}
    assert allocate({"a": 0.0, "b": 1.0}, 5) == {"a": 0, "b": 5}
    assert allocate({"only": 0.2}, 7) == {"only": 7} and allocate({"a": 1.0}, 0) == {"a": 0}
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = dict(zip("abcde", rng.random(5)))
        assert sum(allocate(w, 97).values()) == 97
    for bad in ({"a": 0.0}, {}):
        with pytest.raises(ValueError, match="positive weight"):
            allocate(bad, 3)
    with pytest.raises(ValueError, match=">= 0"):
        allocate({"a": -1.0, "b": 2.0}, 3)


def test_balanced_sample_is_seeded_and_replays_a_small_domain_evenly():
    rows = {"big": [f"b{i}" for i in range(10)], "small": ["s0", "s1"]}
    got = balanced_sample(rows, {"big": 4, "small": 5}, seed=3)
    assert got == balanced_sample(rows, {"big": 4, "small": 5}, seed=3)
    assert len(got["big"]) == 4 and len(set(got["big"])) == 4 and set(got["big"]) <= set(rows["big"])
    assert sorted(got["small"]).count("s0") in (2, 3) and len(got["small"]) == 5  # each row before any repeats
    assert balanced_sample(rows, {"big": 0}, seed=0) == {"big": []}
    with pytest.raises(ValueError, match="no rows to draw from"):
        balanced_sample({"big": []}, {"big": 2}, seed=0)
