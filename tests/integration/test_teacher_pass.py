"""The teacher pass on the tiny teacher with the real vLLM: both modes, inputs, bad rows, resume."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raydistill.data.entropy import TAIL_LOGIT_SCALE
from raydistill.data.signals import LOGPROB_SCALE, SIGNAL_SCHEMA, load_signals, read_signal_meta

pytestmark = pytest.mark.integration
# Stored log-probs come back within 1 / LOGPROB_SCALE nats of the engine's (half a step of
# quantization plus the shift that restores the stored tail), plus the tail's own rounding (half a step
# of its logit at most), and the tail is kept positive, so it is never below zero beyond float32 rounding.
TAIL_TOL = 1e-6
LP_TOL = 1.0 / LOGPROB_SCALE + 0.5 / TAIL_LOGIT_SCALE + 2e-3
ROOT = Path(__file__).resolve().parents[2]


def _table(signals_dir):
    return load_signals(signals_dir)


def _rows_by_id(signals_dir):
    return {r["id"]: r for r in _table(signals_dir).to_pylist()}


def _check_topk(row, k):
    n_targets = len(row["input_ids"]) - row["target_start"]
    assert len(row["topk_ids"]) == len(row["topk_logprobs"]) == n_targets > 0
    for ids_t, lps_t in zip(row["topk_ids"], row["topk_logprobs"]):
        assert len(ids_t) == k == len(set(ids_t))
        assert lps_t == sorted(lps_t, reverse=True)
        tail = 1.0 - float(np.exp(np.asarray(lps_t, dtype=np.float64)).sum())
        assert -TAIL_TOL <= tail <= 1.0


def _spec_with(tiny_spec, tmp_path, corpus, **sections):
    data = tiny_spec.data.model_copy(update={"path": str(corpus), **sections.get("data", {})})
    tp = tiny_spec.teacher_pass.model_copy(update=sections.get("teacher_pass", {}))
    return data, tp


GOOD = [
    {"id": "g1", "prompt": "Describe the quiet forest.", "response": " It is calm and green."},
    {"id": "g2", "prompt": "What does the river remember?", "response": " The first snow."},
    {"id": "g3", "prompt": "Write a haiku about time.", "response": " Time moves, the clock sleeps."},
]


def _mixed_corpus(path: Path) -> dict[str, str]:
    """Good rows plus one of each kind of bad row; returns {line number: expected reason fragment}."""
    lines = [json.dumps(r).encode() for r in GOOD[:2]]
    bad = {
        b'{"id": "b1", "prompt": "unterminated': "invalid JSON",
        json.dumps({"id": "b2", "response": "no prompt"}).encode(): "missing field 'prompt'",
        json.dumps({"id": "b3", "prompt": "   ", "response": "x"}).encode(): "field 'prompt' is empty",
        json.dumps({"id": "b4", "prompt": 5, "response": "x"}).encode(): "must be a string",
        b'{"id": "b5", "prompt": "bad \xff\xfe bytes", "response": "x"}': "invalid UTF-8",
        json.dumps({"id": "b6", "prompt": "word " * 200, "response": "x"}).encode(): "exceeds the limit",
        b"[1, 2, 3]": "expected a JSON object",
        b'{"id": "b8", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}": "RecursionError",
        b'{"id": "b9", "prompt": "' + b"x" * (50 << 20) + b'"}': "over the limit of 16777216 (data.max_record_bytes)",
    }
    expected = {}
    for raw, reason in bad.items():
        lines.append(raw)
        expected[str(len(lines))] = reason
    lines.append(json.dumps(GOOD[2]).encode())
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


def test_score_mode_exact_ids_and_bad_rows_rejected(ray_local, tiny_spec, model_paths, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.teacher.stage import run_teacher_stage

    corpus = tmp_path / "mixed.jsonl"
    expected_bad = _mixed_corpus(corpus)
    data, tp = _spec_with(tiny_spec, tmp_path, corpus, data={"max_prompt_tokens": 64}, teacher_pass={"mode": "score", "top_k": 6})
    signals = tmp_path / "signals"
    out = run_teacher_stage(data, tiny_spec.teacher, tp, model_paths[0], str(signals))

    assert _table(signals).schema == SIGNAL_SCHEMA
    rows = _rows_by_id(signals)
    assert sorted(rows) == ["g1", "g2", "g3"] and out["rows"] == 3 and out["rejected_rows"] == len(expected_bad)
    tok = AutoTokenizer.from_pretrained(model_paths[0])
    teacher = AutoModelForCausalLM.from_pretrained(model_paths[0], dtype=torch.float32).eval()
    for g in GOOD:
        row = rows[g["id"]]
        prompt_ids = tok(g["prompt"]).input_ids
        assert row["input_ids"] == prompt_ids + tok(g["response"], add_special_tokens=False).input_ids
        assert row["target_start"] == len(prompt_ids)
        _check_topk(row, 6)
        with torch.no_grad():
            logp = torch.log_softmax(teacher(torch.tensor([row["input_ids"]])).logits[0].double(), -1)
        for j, (ids_t, lps_t) in enumerate(zip(row["topk_ids"], row["topk_logprobs"])):
            np.testing.assert_allclose(lps_t, logp[row["target_start"] + j - 1, ids_t].numpy(), atol=LP_TOL)

    rejected = [json.loads(l) for l in (signals / "_rejected.jsonl").read_text().splitlines()]
    by_line = {r["source"].rsplit(":", 1)[1]: r for r in rejected}
    assert set(by_line) == set(expected_bad)
    for line, fragment in expected_bad.items():
        assert fragment in by_line[line]["reason"], by_line[line]
        assert by_line[line]["source"].startswith(str(corpus))
    assert read_signal_meta(signals)["mode"] == "score"


def test_on_bad_row_fail_stops_before_the_teacher(ray_local, tiny_spec, model_paths, tmp_path):
    from raydistill.teacher.stage import BadRowsError, run_teacher_stage

    corpus = tmp_path / "mixed.jsonl"
    _mixed_corpus(corpus)
    data, tp = _spec_with(tiny_spec, tmp_path, corpus, data={"on_bad_row": "fail", "max_prompt_tokens": 64}, teacher_pass={"mode": "score"})
    with pytest.raises(BadRowsError) as err:
        run_teacher_stage(data, tiny_spec.teacher, tp, model_paths[0], str(tmp_path / "signals"))
    assert "invalid JSON" in str(err.value) and f"{corpus}:3" in str(err.value)
    assert not list((tmp_path / "signals").glob("*.parquet"))


def test_score_mode_text_documents(ray_local, tiny_spec, model_paths, tmp_path):
    from transformers import AutoTokenizer

    from raydistill.teacher.stage import run_teacher_stage

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The river remembers the first snow.\n\nA small robot builds a hidden door.\n")
    (docs / "b.txt").write_text("The night train follows the path home.\n")
    data, tp = _spec_with(tiny_spec, tmp_path, f"{docs}/*.txt", data={"format": "text"}, teacher_pass={"mode": "score", "top_k": 4})
    run_teacher_stage(data, tiny_spec.teacher, tp, model_paths[0], str(tmp_path / "signals"))
    rows = _table(tmp_path / "signals").to_pylist()
    tok = AutoTokenizer.from_pretrained(model_paths[0])
    assert sorted(r["prompt"] for r in rows) == sorted(
        ["The river remembers the first snow.", "A small robot builds a hidden door.", "The night train follows the path home."]
    )
    for row in rows:
        assert row["input_ids"] == tok(row["prompt"]).input_ids and row["target_start"] == 1
        _check_topk(row, 4)


def test_generate_chat_messages_with_system_prompt_and_n_samples(ray_local, tiny_spec, model_paths, tmp_path):
    from transformers import AutoTokenizer

    from raydistill.teacher.stage import run_teacher_stage

    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in [
        {"id": "c1", "messages": [{"role": "user", "content": "Describe the quiet forest."}]},
        {"id": "c2", "messages": [{"role": "user", "content": "What does the river remember?"}]},
    ]) + "\n")
    tp_update = {"system_prompt": "Be brief.", "top_k": 5, "sampling": tiny_spec.teacher_pass.sampling.model_copy(update={"n": 2, "max_tokens": 6})}
    data, tp = _spec_with(tiny_spec, tmp_path, corpus, teacher_pass=tp_update)
    run_teacher_stage(data, tiny_spec.teacher, tp, model_paths[0], str(tmp_path / "signals"))
    rows = _rows_by_id(tmp_path / "signals")
    assert sorted(rows) == ["c1#0", "c1#1", "c2#0", "c2#1"]
    tok = AutoTokenizer.from_pretrained(model_paths[0])
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the quiet forest."}], tokenize=False, add_generation_prompt=True
    )
    assert rows["c1#0"]["input_ids"][: rows["c1#0"]["target_start"]] == tok(rendered).input_ids
    for row in rows.values():
        _check_topk(row, 5)
        assert len(row["input_ids"]) - row["target_start"] <= 6


def test_killed_teacher_pass_resumes_without_loss(tiny_spec, tmp_path, free_port, kill_when):
    """SIGKILL the driver once shards exist; the re-run completes every id exactly once."""
    corpus = tmp_path / "prompts.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i:03d}", "prompt": f"Tell me about the river number {i}."}) + "\n" for i in range(96)))
    spec = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    spec["data"]["path"] = str(corpus)
    spec["teacher"]["batch_size"] = 4
    spec["teacher_pass"]["shard_rows"] = 4  # many small shards, so the kill lands between two of them
    spec["teacher_pass"]["sampling"]["max_tokens"] = 16
    spec["runtime"]["run_dir"] = str(tmp_path / "run")
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    signals = tmp_path / "run" / "signals"
    cmd = [str(Path(sys.executable).parent / "raydistill"), "run", str(spec_path), "--stages", "teacher"]

    kill_when(cmd, lambda: len(list(signals.glob("*.parquet"))) >= 2, "two shards were written", 600)

    # The kept shards are entropy coded with the models learned by the first attempt; the re-run must write with the same.
    codec = read_signal_meta(signals)["signal_codec"]
    assert codec["ids"]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    outputs = manifest["stages"]["teacher"]["outputs"]
    assert outputs["resumed_rows"] > 0, "the re-run redid every row"
    ids = _table(signals)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 96
    assert sorted(ids) == [f"p{i:03d}" for i in range(96)]
    assert read_signal_meta(signals)["signal_codec"] == codec


def test_repeated_ids_are_named_before_any_engine_starts(ray_local, tiny_spec, model_paths, tmp_path):
    from raydistill.teacher.stage import BadRowsError, run_teacher_stage

    corpus = tmp_path / "dupes.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}, {"id": "a", "prompt": "three"}]))
    data, tp = _spec_with(tiny_spec, tmp_path, corpus)
    with pytest.raises(BadRowsError) as err:
        run_teacher_stage(data, tiny_spec.teacher, tp, model_paths[0], str(tmp_path / "signals"))
    assert f"'a' at {corpus}:1, {corpus}:3" in str(err.value) and "'b'" not in str(err.value)
    assert not list((tmp_path / "signals").glob("*.parquet"))


def _plain(x):
    """Ray rows (numpy arrays, nested) -> plain Python lists, for comparing the two paths' rows."""
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x] if x.dtype == object else x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def test_array_path_matches_the_dict_path_on_the_real_teacher(ray_local, tiny_spec, model_paths, tmp_path):
    """The same score-mode requests through ray.data.llm's dict path (processor + to_signal_row) and through the
    array path (SignalEngineUDF): the same ids, target starts, top-k ids and log-probs; target_logprob is the
    given token's log-prob, equal to its top-k entry wherever it is in the top k."""
    from raydistill.data.corpus import prepare_requests
    from raydistill.teacher.stage import build_teacher_processor, max_prompt_tokens, teacher_signals

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    data, tp = _spec_with(tiny_spec, tmp_path, corpus, data={"eval_fraction": 0.0}, teacher_pass={"mode": "score", "top_k": 4})
    path = model_paths[0]
    requests = prepare_requests(data, tp, path, max_prompt_tokens(data, tiny_spec.teacher, tp, path)).filter(lambda r: r["reject"] == "").materialize()

    old = {r["id"]: r for r in (_plain(dict(r)) for r in build_teacher_processor(tiny_spec.teacher, tp, path)(requests).take_all())}
    new = {r["id"]: r for r in (_plain(dict(r)) for r in teacher_signals(requests, tiny_spec.teacher, tp, path).take_all())}
    assert sorted(old) == sorted(new) == ["g1", "g2", "g3"]
    outside = 0
    for i in old:
        o, n = old[i], new[i]
        assert n["reject"] == o["reject"] == ""
        for c in ("input_ids", "target_start", "topk_ids", "response"):
            assert n[c] == o[c], (i, c)
        # Two engines, each batching on its own: vLLM-CPU's float32 sums can differ in the last bits between
        # batch shapes; the conversions themselves are exact (tests/unit/test_teacher_arrays.py, same outputs).
        np.testing.assert_allclose(np.asarray(n["topk_logprobs"]), np.asarray(o["topk_logprobs"], np.float32), rtol=0, atol=1e-5)
        assert len(n["target_logprob"]) == len(n["topk_ids"])
        for t, (ids_t, lps_t, lp) in enumerate(zip(n["topk_ids"], n["topk_logprobs"], n["target_logprob"])):
            actual = n["input_ids"][n["target_start"] + t]
            if actual in ids_t:
                assert lp == lps_t[ids_t.index(actual)]
            else:
                outside += 1
                assert lp <= lps_t[-1]
    assert outside > 0  # the random tiny teacher puts given tokens outside its top 4: that case is covered


@pytest.mark.parametrize("where", ["driver", "ray_data"])
def test_repeated_ids_are_found_across_files_and_shown_by_id(ray_local, tiny_spec, tmp_path, monkeypatch, where):
    """The duplicate-id pre-pass names every place a repeated id occurs, across files, the first ``shown`` by id; unique ids pass.
    Both ways it runs: on the driver (small local JSONL) and as a Ray Data pass (larger or remote corpora), the same answers."""
    from raydistill.data import corpus
    from raydistill.data.corpus import duplicate_ids

    if where == "ray_data":
        monkeypatch.setattr(corpus, "DRIVER_ID_PASS_BYTES", 0)

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"id": i, "prompt": "x"}) + "\n" for i in ["u1", "r1", "u2", "r2", "r1"]) + "not json\n")
    b.write_text("".join(json.dumps({"id": i, "prompt": "y"}) + "\n" for i in ["r1", "u3", "r2"]) + json.dumps({"prompt": "no id"}) + "\n")
    data = tiny_spec.data.model_copy(update={"path": f"{a},{b}"})
    expected = [("r1", [f"{a}:2", f"{a}:5", f"{b}:1"]), ("r2", [f"{a}:4", f"{b}:3"])]
    assert duplicate_ids(data, 10) == expected
    assert duplicate_ids(data, 1) == expected[:1]
    unique = tmp_path / "u.jsonl"
    unique.write_text("".join(json.dumps({"id": f"p{i}", "prompt": "z"}) + "\n" for i in range(300)))
    assert duplicate_ids(tiny_spec.data.model_copy(update={"path": str(unique)}), 10) == []
