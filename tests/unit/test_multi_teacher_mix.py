"""The ensemble's table-level steps: score requests from signals, aligning teachers' rows, mixing whole signal directories."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.data.signals import FULL_SIGNAL_COLUMNS, FULL_SIGNAL_SCHEMA, LOGPROB_SCALE, PARQUET_WRITE_ARGS, encode_signals, load_signals, write_signal_meta
from raydistill.teacher.ensemble import mix_topk
from raydistill.teacher.multi import _align, corpus_domain_errors, mix_rows, mix_signal_dirs, requests_from_signals

K = 3


def _rows(seed: int, ids=("a", "b", "c"), vocab: int = 12) -> pa.Table:
    """Signal rows of a random teacher over fixed tokens: row n has n + 2 target positions."""
    rng = np.random.default_rng(seed)
    out = {c: [] for c in FULL_SIGNAL_COLUMNS}
    for n, i in enumerate(ids):
        positions = n + 2
        logits = rng.normal(size=(positions, vocab))
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        top = np.argsort(-logp, axis=1)[:, :K]
        # The same tokens for every teacher (seeded by the row): the others score the first one's tokens.
        tokens = [1, 5, 7] + [int(t) for t in np.random.default_rng(100 + n).integers(0, vocab, positions)]
        out["id"].append(i)
        out["split"].append("eval" if i == "c" else "train")
        out["input_ids"].append(tokens)
        out["target_start"].append(3)
        out["topk_ids"].append(top.tolist())
        out["topk_logprobs"].append(np.take_along_axis(logp, top, 1).tolist())
        out["target_logprob"].append([float(logp[p, t]) for p, t in enumerate(tokens[3:])])
        out["prompt"].append(f"prompt {i}")
        out["response"].append(f"response {i}")
    return pa.table(out, schema=FULL_SIGNAL_SCHEMA)


def _write_dir(path, table: pa.Table, rejected: list[dict] = ()) -> str:
    write_signal_meta(path, {"logprob_scale": LOGPROB_SCALE, "teacher": "t", "mode": "generate"})
    pq.write_table(encode_signals(table), path / "part-0.parquet", **PARQUET_WRITE_ARGS)
    if rejected:
        (path / "_rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
    return str(path)


def test_score_requests_cover_exactly_the_signal_tokens():
    table = _rows(0)
    req = requests_from_signals(table.select(["id", "split", "prompt", "response", "input_ids", "target_start"])).to_pylist()
    for r, ids in zip(req, table["input_ids"].to_pylist()):
        assert r["prompt_ids"] == ids[:3] and r["target_ids"] == ids[3:]
        assert r["reject"] == "" and r["source"] == r["id"]


def test_mix_rows_is_the_per_position_mixture_with_the_first_teachers_rows():
    a, b = _rows(1), _rows(2)
    mixed = mix_rows([a, b], [0.25, 0.75])
    assert mixed.schema == FULL_SIGNAL_SCHEMA
    for ra, rb, rm in zip(a.to_pylist(), b.to_pylist(), mixed.to_pylist()):
        ids, lps = mix_topk([np.array(ra["topk_ids"]), np.array(rb["topk_ids"])], [np.array(ra["topk_logprobs"]), np.array(rb["topk_logprobs"])], [0.25, 0.75])
        assert rm["topk_ids"] == ids.tolist()
        np.testing.assert_allclose(rm["topk_logprobs"], lps, rtol=1e-6)
        p = 0.25 * np.exp(ra["target_logprob"]) + 0.75 * np.exp(rb["target_logprob"])
        np.testing.assert_allclose(rm["target_logprob"], np.log(p), rtol=1e-5)
        assert (rm["id"], rm["input_ids"], rm["target_start"], rm["prompt"]) == (ra["id"], ra["input_ids"], ra["target_start"], ra["prompt"])


def test_two_identical_teachers_at_half_weight_give_the_single_teachers_signals():
    a = _rows(3)
    mixed = mix_rows([a, a], [0.5, 0.5])
    for ra, rm in zip(a.to_pylist(), mixed.to_pylist()):
        ids = np.array(rm["topk_ids"])
        assert (ids[:, :K] == np.array(ra["topk_ids"])).all() and (ids[:, K:] == -1).all()
        np.testing.assert_allclose(np.array(rm["topk_logprobs"])[:, :K], ra["topk_logprobs"], rtol=1e-6)
        np.testing.assert_allclose(rm["target_logprob"], ra["target_logprob"], rtol=1e-6)


def test_align_reorders_and_names_rows_it_cannot_match():
    a = _rows(4)
    b = _rows(5).take([2, 0])  # no row "b", and the other two in another order
    tokens = b["input_ids"].to_pylist()
    aligned, missing = _align(a, b)
    assert aligned["id"].to_pylist() == ["a", "c"] and missing == [1]
    other = b.set_column(2, "input_ids", pa.array([tokens[0], [9, 9, 9]], b.schema.field("input_ids").type))  # "a" scored on other tokens
    aligned, missing = _align(a, other)
    assert aligned["id"].to_pylist() == ["c"] and missing == [0, 1]


def test_mix_signal_dirs_keeps_rows_every_teacher_scored_and_rejects_the_rest(tmp_path):
    a, b = _rows(6), _rows(7)
    first = _write_dir(tmp_path / "a", a, rejected=[{"source": "c.jsonl:9", "id": None, "reason": "empty document"}])
    second = _write_dir(tmp_path / "b", b.filter(pa.array([True, False, True])))  # its engine lost row "b"
    out = tmp_path / "mixed"
    write_signal_meta(out, {"logprob_scale": LOGPROB_SCALE, "teacher": "t"})
    (out / "stale.parquet").write_bytes(b"not a shard of this mixture")
    summary = mix_signal_dirs([first, second], ["one", "two"], [1.0, 1.0], str(out))
    assert summary == {"signals_dir": str(out), "rows": 2, "train_rows": 1, "eval_rows": 1, "rejected_rows": 2}
    assert not (out / "stale.parquet").exists()
    stored = load_signals(out, FULL_SIGNAL_COLUMNS)
    assert stored["id"].to_pylist() == ["a", "c"]
    # The mixture of what each teacher's directory holds (its stored, quantized log-probs), re-quantized once more.
    keep = pa.array([True, False, True])
    want = mix_rows([load_signals(first, FULL_SIGNAL_COLUMNS).filter(keep), load_signals(second, FULL_SIGNAL_COLUMNS)], [1.0, 1.0])
    assert stored["topk_ids"].to_pylist() == want["topk_ids"].to_pylist()
    flat = lambda t, c: np.concatenate([np.ravel(x) for x in t[c].to_pylist()])  # noqa: E731
    real = flat(stored, "topk_ids") >= 0
    np.testing.assert_allclose(flat(stored, "topk_logprobs")[real], flat(want, "topk_logprobs")[real], atol=1.5 / 16)
    np.testing.assert_allclose(flat(stored, "target_logprob"), flat(want, "target_logprob"), atol=1.5 / 16)
    rejected = [json.loads(l) for l in (out / "_rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejected] == ["b", None]
    assert "teacher 'two' has no signal" in rejected[0]["reason"] and rejected[1]["reason"] == "empty document"


def test_corpus_domains_without_a_teacher_are_named_with_their_line(tmp_path):
    from raydistill.spec import DataSpec, TeacherEntry

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "x", "d": "a"}\n{"prompt": "y", "d": "z"}\nnot json\n{"prompt": "w", "d": "z"}\n{"prompt": "v"}\n')
    data = DataSpec(path=str(corpus), domain_field="d")
    teachers = [TeacherEntry(name="one", model="tiny:teacher", domains=["a"])]
    assert corpus_domain_errors(data, teachers) == [
        f"data.domain_field: d 'z' (first at {corpus}:2) has no teacher; list it in some teachers[].domains"]
    teachers.append(TeacherEntry(name="two", model="tiny:teacher", domains=["z"]))
    assert corpus_domain_errors(data, teachers) == []


def test_a_mixture_target_above_its_top1_is_stored_as_it_is(tmp_path):
    """Token 0 is teacher a's top-1 (0.3) and outside teacher b's top 3 (0.2 there): the union lists it at
    0.5 * 0.3 = 0.15, its exact mixture probability is 0.25, above every stored top-k entry."""
    def teacher(probs: list[float]) -> pa.Table:
        p = np.array(probs + [(1 - sum(probs)) / (12 - len(probs))] * (12 - len(probs)))
        top = np.argsort(-p, kind="stable")[:K]
        return pa.table({"id": ["a"], "split": ["train"], "input_ids": [[1, 5, 7, 0]], "target_start": [3], "topk_ids": [[top.tolist()]],
                         "topk_logprobs": [[np.log(p[top]).tolist()]], "prompt": ["p"], "response": ["r"], "target_logprob": [[float(np.log(p[0]))]]},
                        schema=FULL_SIGNAL_SCHEMA)

    a = teacher([0.3, 0.2, 0.2])
    b = teacher([0.2, 0.0, 0.0, 0.25, 0.25, 0.25])
    out = tmp_path / "mixed"
    write_signal_meta(out, {"logprob_scale": LOGPROB_SCALE, "teacher": "t"})
    mix_signal_dirs([_write_dir(tmp_path / "a", a), _write_dir(tmp_path / "b", b)], ["one", "two"], [1.0, 1.0], str(out))
    stored = load_signals(out, FULL_SIGNAL_COLUMNS).to_pylist()[0]
    assert max(stored["topk_logprobs"][0]) < np.log(0.25) - 0.4
    np.testing.assert_allclose(stored["target_logprob"], [np.log(0.25)], atol=1.5 / 16)
