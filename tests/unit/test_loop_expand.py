"""The loop's expand policy on its own: seeds, few-shot requests, the written rows and their signals (no Ray, no models)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.data.signals import FULL_SIGNAL_SCHEMA, PARQUET_WRITE_ARGS, encode_signals, learn_id_order, load_signals, write_signal_meta
from raydistill.loop.expand import fewshot_text, new_prompt, new_rows, plan_requests, seed_rows
from raydistill.loop.rounds import choose_rows, write_round_signals
from raydistill.spec import LoopExpandSpec, LoopSpec, SpecError, spec_from_dict

TRAIN = {"code": [f"c{i}" for i in range(6)], "prose": ["p0", "p1"]}


def test_seeds_are_each_domains_hardest_split_by_weight():
    ranked = {"code": ["c5", "c4", "c3"], "prose": ["p1", "p0"]}
    assert seed_rows(ranked, {"code": 0.75, "prose": 0.25}, 4) == {"code": ["c5", "c4", "c3"], "prose": ["p1"]}
    # a domain with fewer scorable rows than its share gives what it has; a zero-weight domain gives none
    assert seed_rows(ranked, {"code": 0.0, "prose": 1.0}, 4) == {"prose": ["p1", "p0"]}
    # one domain; an empty ranking; no weight anywhere
    assert seed_rows({"all": ["a", "b"]}, {"all": 1.0}, 1) == {"all": ["a"]}
    assert seed_rows({"code": []}, {"code": 1.0}, 3) == {}
    assert seed_rows(ranked, {}, 3) == {}


def test_requests_put_the_seed_last_after_other_rows_of_its_domain():
    plan = plan_requests({"code": ["c5"], "prose": ["p1"]}, TRAIN, shots=3, r=2, seed=0)
    assert [q["id"] for q in plan] == ["c5@r2", "p1@r2"] and [q["parent_id"] for q in plan] == ["c5", "p1"]
    code, prose = plan
    assert code["examples"][-1] == "c5" and len(code["examples"]) == 3 and set(code["examples"][:2]) <= set(TRAIN["code"]) - {"c5"}
    assert prose["examples"] == ["p0", "p1"]  # the domain has only one other row
    assert plan == plan_requests({"code": ["c5"], "prose": ["p1"]}, TRAIN, shots=3, r=2, seed=0)  # seeded
    assert plan_requests({"code": ["c5"]}, TRAIN, shots=1, r=1, seed=0)[0]["examples"] == ["c5"]
    assert plan_requests({}, TRAIN, shots=3, r=1, seed=0) == []


def test_fewshot_text_folds_lines_and_keeps_braces():
    spec = LoopExpandSpec()
    text = fewshot_text(spec, ["Say {x}\nplease.", "  Why   is the sky blue? "])
    assert text == "Prompts on the same subjects, one per line:\n- Say {x} please.\n- Why is the sky blue?\n- "
    custom = LoopExpandSpec(template="Q: {examples}\nQ:", example="{prompt}")
    assert fewshot_text(custom, ["a", "b"]) == "Q: a\nb\nQ:"
    with pytest.raises(ValueError, match="template"):
        LoopExpandSpec(template="no placeholder")
    with pytest.raises(ValueError, match="example"):
        LoopExpandSpec(example="- {prompt} {prompt}")


def test_written_rows_carry_parent_and_round_and_keep_empty_prompts_for_the_pass_to_reject():
    requests = [{"id": "c5@r1", "parent_id": "c5", "domain": "code"}, {"id": "p1@r1", "parent_id": "p1", "domain": "prose"}]
    written = [("p1@r1#0", "How do tides work?\n- and more"), ("c5@r1#1", "  "), ("c5@r1#0", " Sort a list in place.")]
    rows = new_rows(written, requests, ["\n"], 1)
    assert rows == [
        {"id": "c5@r1#0", "prompt": "Sort a list in place.", "domain": "code", "parent_id": "c5", "round": 1},
        {"id": "c5@r1#1", "prompt": "", "domain": "code", "parent_id": "c5", "round": 1},
        {"id": "p1@r1#0", "prompt": "How do tides work?", "domain": "prose", "parent_id": "p1", "round": 1},
    ]
    assert new_rows([("c5@r1", "x")], requests, [], 1)[0]["id"] == "c5@r1"  # one sample per seed: no suffix
    with pytest.raises(ValueError, match="answers no request"):
        new_rows([("zz@r1#0", "x")], requests, [], 1)
    assert new_prompt("a STOP b", ["STOP", ""]) == "a"


def _signals(path, ids, domain, token_offset=0, with_order=False):
    rows = {c: [] for c in FULL_SIGNAL_SCHEMA.names}
    for n, i in enumerate(ids):
        rows["id"].append(i)
        rows["split"].append("train")
        rows["input_ids"].append([1, 2, 3])
        rows["target_start"].append(1)
        rows["topk_ids"].append([[2 + token_offset, 4 + token_offset], [3 + token_offset, 5 + token_offset]])
        rows["topk_logprobs"].append([[-0.1, -3.0], [-0.2, -2.5]])
        rows["target_logprob"].append([-0.1, -0.2])
        rows["prompt"].append(i)
        rows["response"].append("r")
    table = pa.table(rows, schema=FULL_SIGNAL_SCHEMA).append_column("domain", pa.array([domain] * len(ids), pa.string()))
    order = learn_id_order(table["topk_ids"]) if with_order else []
    write_signal_meta(path, {"logprob_scale": 16, "teacher": "t", "topk_id_order": order, "tokenizer_fingerprint": "fp"})
    pq.write_table(encode_signals(table, 16, order), path / "part-0.parquet", **PARQUET_WRITE_ARGS)
    return path


def test_round_signals_take_the_new_rows_in_the_corpus_id_order_with_their_labels(tmp_path):
    src = _signals(tmp_path / "src", ["c0", "c1"], "code", with_order=True)
    new = _signals(tmp_path / "new", ["c1@r1#0", "c1@r1#1"], "code", token_offset=40, with_order=True)
    labels = {"c1@r1#0": ("c1", 1), "c1@r1#1": ("c1", 1)}
    n = write_round_signals(src, ["c0", "c1@r1#0", "c1@r1#0"], tmp_path / "round", new / "", labels)
    table = load_signals(tmp_path / "round", ["id", "topk_ids", "topk_logprobs", "domain", "parent_id", "round"])
    assert n == 3 and table["id"].to_pylist() == ["c0", "c1@r1#0", "c1@r1#0"]
    assert table["topk_ids"].to_pylist() == [[[2, 4], [3, 5]], [[42, 44], [43, 45]], [[42, 44], [43, 45]]]
    assert table["topk_logprobs"].to_pylist()[1][0] == pytest.approx([-0.1, -3.0], abs=0.05)
    assert table["parent_id"].to_pylist() == [None, "c1", "c1"] and table["round"].to_pylist() == [None, 1, 1]
    assert table["domain"].to_pylist() == ["code"] * 3


def test_new_rows_fill_their_domains_share_before_the_draw():
    loop = LoopSpec(rounds=2, policy=["uniform", "expand"])
    chosen = choose_rows(loop, {"code": 0.5, "prose": 0.5}, TRAIN, None, 4, seed=0, new_rows={"code": ["n0", "n1", "n2"]})
    assert chosen["code"] == ["n0", "n1"] and len(chosen["prose"]) == 2  # the share caps them
    hard = LoopSpec(rounds=2, policy=["hard", "expand"], hard={"fraction": 0.5})
    scores = {i: ("code", 4, float(n), 0.0, 4.0) for n, i in enumerate(TRAIN["code"])} | {"p0": ("prose", 1, 1.0, 0.0, 1.0), "p1": ("prose", 1, 0.0, 0.0, 1.0)}
    chosen = choose_rows(hard, {"code": 1.0, "prose": 0.0}, TRAIN, scores, 4, seed=0, new_rows={"code": ["n0"]})
    assert chosen["code"][:3] == ["c5", "c4", "n0"] and len(chosen["code"]) == 4
    empty = choose_rows(loop, {"code": 1.0, "prose": 0.0}, TRAIN, None, 2, seed=0, new_rows={})
    assert len(empty["code"]) == 2 and empty["prose"] == []


def test_expand_spec_checks(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    raw = {"teacher": {"model": "tiny:teacher"}, "student": {"model": "tiny:student"}, "data": {"path": str(corpus)},
           "runtime": {"run_dir": str(tmp_path / "run")}, "loop": {"rounds": 2, "policy": ["hard", "expand"]}}
    assert spec_from_dict(raw).loop.policies == {"hard", "expand"}
    with pytest.raises(SpecError) as err:
        spec_from_dict({**raw, "teacher_pass": {"mode": "score"}})
    assert err.value.errors == ["loop.policy: expand needs teacher_pass.mode generate (the teacher answers the prompts it writes)"]
    with pytest.raises(SpecError) as err:
        spec_from_dict({**raw, "loop": {"rounds": 2, "policy": "expand", "expand": {"template": "nothing"}}})
    assert any("loop.expand" in e and "{examples}" in e for e in err.value.errors), err.value.errors
