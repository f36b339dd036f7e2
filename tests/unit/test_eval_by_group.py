"""Several teachers in the eval: per-row scores summed per domain, the student-only scorer, and the report's tables."""

import math

import numpy as np
import pytest

from raydistill.eval.report import write_markdown
from raydistill.eval.stage import PairScorer, mean_kl, sum_scores, summarize, summarize_groups


def _scores(domains, teachers, tokens, student_nll, teacher_nll, kl, top1):
    """One per-row batch as ``PairScorer`` returns it (strings as Ray Data hands them: object arrays)."""
    return {"tokens": np.asarray(tokens, np.int64), "student_nll": np.asarray(student_nll, float), "teacher_nll": np.asarray(teacher_nll, float),
            "kl": np.asarray(kl, float), "top1_agree": np.asarray(top1, float),
            "domain": np.asarray(domains, object), "teacher": np.asarray(teachers, object)}


BATCHES = [
    _scores(["code", "chat", "code"], ["coder", "chatter", "coder"], [2, 4, 6], [2.0, 8.0, 6.0], [1.0, 4.0, 3.0], [1.0, 2.0, 3.0], [2.0, 1.0, 2.0]),
    _scores(["chat", "math"], ["chatter", "mathy"], [4, 0], [4.0, 0.0], [2.0, 0.0], [6.0, 0.0], [3.0, 0.0]),
]


def test_sum_scores_adds_every_row_and_only_the_columns_present():
    totals, n_rows = sum_scores(BATCHES)
    assert n_rows == 5
    assert totals == {"tokens": 16, "student_nll": 20.0, "teacher_nll": 10.0, "kl": 12.0, "top1_agree": 8.0}
    # A student-only scorer has no teacher_nll: nothing is invented for it.
    student_only = [{k: v for k, v in b.items() if k != "teacher_nll"} for b in BATCHES]
    assert "teacher_nll" not in sum_scores(student_only)[0]
    assert mean_kl(totals) == pytest.approx(12.0 / 16)
    assert mean_kl({"kl": 0.0, "tokens": 0}) == 0.0


def test_groups_are_token_weighted_sums_per_domain_across_batches():
    groups = summarize_groups(BATCHES)
    assert list(groups) == ["chat", "code", "math"]  # sorted, whichever batch a domain first appears in
    # code: rows 0 and 2 of the first batch -> 8 tokens, student NLL 8, teacher NLL 4, KL 4, top-1 4.
    assert groups["code"] == {"teacher": "coder", "eval_sequences": 2, "eval_tokens": 8, "kl_to_teacher": pytest.approx(0.5),
                              "top1_agreement": pytest.approx(0.5), "student_nll": pytest.approx(1.0), "teacher_nll": pytest.approx(0.5)}
    # chat: one row in each batch -> 8 tokens, student NLL 12, teacher NLL 6, KL 8, top-1 4.
    assert groups["chat"] == {"teacher": "chatter", "eval_sequences": 2, "eval_tokens": 8, "kl_to_teacher": pytest.approx(1.0),
                              "top1_agreement": pytest.approx(0.5), "student_nll": pytest.approx(1.5), "teacher_nll": pytest.approx(0.75)}
    # A domain without target tokens has zero means, as summarize gives an empty set.
    assert groups["math"]["eval_tokens"] == 0 and groups["math"]["kl_to_teacher"] == 0.0
    # The groups add up to the whole.
    totals, n_rows = sum_scores(BATCHES)
    assert sum(g["eval_sequences"] for g in groups.values()) == n_rows
    assert sum(g["kl_to_teacher"] * g["eval_tokens"] for g in groups.values()) == pytest.approx(totals["kl"])


def test_a_domain_with_rows_from_two_teachers_names_both():
    groups = summarize_groups([_scores(["code", "code"], ["b", "a"], [1, 1], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0])])
    assert groups["code"]["teacher"] == "a+b"


def _report(**extra) -> dict:
    report = summarize({"tokens": 16, "student_nll": 20.0, "teacher_nll": 10.0, "kl": 12.0, "top1_agree": 8.0}, 5)
    for m in ("student", "teacher"):
        report[m].update(parameters=10, bytes_on_disk=1000)
    return {**report, **extra}


def test_markdown_has_a_kl_by_domain_table_for_domain_routing(tmp_path):
    write_markdown(_report(by_domain=summarize_groups(BATCHES)), tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "## KL by domain" in text and "## KL by teacher" not in text
    assert "| code | coder | 2 | 8 | 0.5000 | 50.0% | 1.000 | 0.500 |" in text
    assert "| chat | chatter | 2 | 8 | 1.0000 | 50.0% | 1.500 | 0.750 |" in text


def test_markdown_has_a_kl_by_teacher_table_with_the_mixture_for_an_ensemble(tmp_path):
    write_markdown(_report(kl_by_teacher={"big": 0.25, "small": 1.5}), tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert "## KL by teacher" in text and "## KL by domain" not in text
    assert "| big | 0.2500 |" in text and "| small | 1.5000 |" in text
    assert "| mixture | 0.7500 |" in text  # kl_to_teacher: 12 / 16


def test_markdown_for_one_teacher_has_neither_table(tmp_path):
    write_markdown(_report(), tmp_path / "report.md")
    assert "KL by" not in (tmp_path / "report.md").read_text()


# --- the scorer itself, called directly (no Ray) on the builtin tiny models -------------------------------------------

def _own_signals(model, seqs, starts, k=8):
    """Signal rows whose stored top-k is ``model``'s own distribution: KL of the model to them is 0."""
    import torch

    ids_col, lp_col = [], []
    with torch.no_grad():
        for seq, start in zip(seqs, starts):
            logp = torch.log_softmax(model(input_ids=torch.as_tensor([seq])).logits[0].double(), -1)
            top = logp[start - 1: len(seq) - 1].topk(k, dim=-1)  # position t is predicted at t - 1
            ids_col.append(np.array([np.array(r) for r in top.indices.tolist()], dtype=object))
            lp_col.append(np.array([np.array(r, np.float32) for r in top.values.tolist()], dtype=object))
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # noqa: E731  (an object array of arrays, as Ray Data gives)
    return {"input_ids": obj([np.asarray(s, np.int32) for s in seqs]), "target_start": np.asarray(starts, np.int32),
            "topk_ids": obj(ids_col), "topk_logprobs": obj(lp_col)}


@pytest.fixture(scope="module")
def tiny():
    from raydistill.models import resolve_model

    return resolve_model("tiny:student"), resolve_model("tiny:teacher")


def test_student_only_scorer_loads_no_teacher_and_scores_its_own_distribution_at_zero_kl(tiny):
    student_path, teacher_path = tiny
    alone = PairScorer(student_path, None, max_seq_len=64, threads=1)
    assert alone.teacher is None
    rng = np.random.default_rng(0)
    seqs = [[1, *rng.integers(3, 200, n).tolist()] for n in (9, 5, 12)]
    rows = _own_signals(alone.student, seqs, starts=[3, 1, 11])
    out = alone(rows)
    assert "teacher_nll" not in out and "domain" not in out
    assert out["tokens"].tolist() == [7, 5, 2]
    np.testing.assert_allclose(out["kl"], 0.0, atol=1e-4)
    assert out["top1_agree"].tolist() == [7.0, 5.0, 2.0]

    # The pair scorer on the same rows: the same student figures, the teacher's NLL besides, and the domain passed through.
    pair = PairScorer(student_path, teacher_path, max_seq_len=64, threads=1)
    rows["domain"] = np.array(["code", "chat", "code"], dtype=object)
    rows["teacher"] = np.array(["coder", "chatter", "coder"], dtype=object)
    both = pair(rows)
    np.testing.assert_allclose(both["kl"], out["kl"], atol=1e-5)
    np.testing.assert_allclose(both["student_nll"], out["student_nll"], rtol=1e-5)
    assert both["domain"].tolist() == ["code", "chat", "code"] and np.isfinite(both["teacher_nll"]).all()
    groups = summarize_groups([both])
    assert groups["code"]["eval_tokens"] == 9 and groups["code"]["teacher"] == "coder"
    assert groups["code"]["student_nll"] == pytest.approx((both["student_nll"][0] + both["student_nll"][2]) / 9)
    assert math.isclose(groups["chat"]["teacher_nll"], both["teacher_nll"][1] / 5, rel_tol=1e-9)
