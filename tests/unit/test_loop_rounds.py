"""The round driver's own logic: next weights, the chosen rows, a round's signals and the loop report (no Ray, no models)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.data.signals import FULL_SIGNAL_SCHEMA, LOGPROB_SCALE, PARQUET_WRITE_ARGS, encode_signals, load_signals, write_signal_meta
from raydistill.loop.rounds import ALL, choose_rows, gaps_of, held_out_slice, next_weights, row_domains, write_loop_report, write_round_signals
from raydistill.spec import LoopSpec, SpecError, spec_from_dict

TRAIN = {"code": [f"c{i}" for i in range(6)], "prose": [f"p{i}" for i in range(2)]}


def _signals(tmp_path, domains: bool = True):
    rows = {c: [] for c in FULL_SIGNAL_SCHEMA.names}
    labels = []
    for d, ids in TRAIN.items():
        for i in ids + [f"{i}-eval" for i in ids]:
            rows["id"].append(i)
            rows["split"].append("eval" if i.endswith("-eval") else "train")
            rows["input_ids"].append([1, 2, 3])
            rows["target_start"].append(1)
            rows["topk_ids"].append([[2, 4], [3, 5]])
            rows["topk_logprobs"].append([[-0.1, -3.0], [-0.2, -2.5]])
            rows["target_logprob"].append([-0.1, -0.2])
            rows["prompt"].append(i)
            rows["response"].append("r")
            labels.append(d)
    table = pa.table(rows, schema=FULL_SIGNAL_SCHEMA)
    if domains:
        table = table.append_column("domain", pa.array(labels, pa.string()))
    write_signal_meta(tmp_path, {"logprob_scale": LOGPROB_SCALE, "teacher": "t"})
    pq.write_table(encode_signals(table), tmp_path / "part-0.parquet", **PARQUET_WRITE_ARGS)
    return tmp_path


def test_rows_by_split_and_domain_and_the_held_out_slice(tmp_path):
    rows = row_domains(_signals(tmp_path))
    assert rows["train"] == {"code": sorted(TRAIN["code"]), "prose": sorted(TRAIN["prose"])}
    assert held_out_slice(rows["eval"], 2) == {"c0-eval", "c1-eval", "p0-eval", "p1-eval"}


def test_without_domains_every_row_is_one_domain(tmp_path):
    rows = row_domains(_signals(tmp_path, domains=False))
    assert set(rows["train"]) == {ALL} and len(rows["train"][ALL]) == 8


def test_ddk_moves_weight_to_the_larger_gap_and_uniform_follows_the_corpus():
    gaps = {"code": {"kl": 0.2}, "prose": {"kl": 1.0}}
    ddk = next_weights(LoopSpec(rounds=2, policy="ddk", ddk={"beta": 0.5, "temperature": 0.5}), {"code": 0.75, "prose": 0.25}, gaps, TRAIN)
    assert ddk["prose"] > 0.25 and ddk["code"] < 0.75 and ddk["code"] + ddk["prose"] == pytest.approx(1.0)
    assert next_weights(LoopSpec(rounds=2, policy="uniform"), {"code": 0.5, "prose": 0.5}, gaps, TRAIN) == {"code": 0.75, "prose": 0.25}
    # a domain measured with no target tokens (NaN) is no evidence: the weights stay
    nan = {"code": {"kl": float("nan")}, "prose": {"kl": float("nan")}}
    assert next_weights(LoopSpec(rounds=2, policy="ddk"), {"code": 0.75, "prose": 0.25}, nan, TRAIN) == {"code": 0.75, "prose": 0.25}


def test_chosen_rows_follow_the_weights_and_replay_the_hardest():
    loop = LoopSpec(rounds=2, policy=["ddk", "hard"], hard={"fraction": 0.5, "criterion": "kl"})
    scores = {i: ("code", 4, float(n), 0.0, 4.0) for n, i in enumerate(TRAIN["code"])}
    scores |= {"p0": ("prose", 2, 0.1, 0.0, 2.0), "p1": ("prose", 0, 0.0, 0.0, 0.0)}  # p1 has no target tokens
    chosen = choose_rows(loop, {"code": 0.5, "prose": 0.5}, TRAIN, scores, 8, seed=1)
    assert {d: len(v) for d, v in chosen.items()} == {"code": 4, "prose": 4}
    assert chosen["code"][:2] == ["c5", "c4"]  # the hardest two (of the four) first
    assert chosen["prose"][:2] == ["p0", "p0"]  # the only scorable row, replayed
    assert sorted(chosen["prose"][2:]) == ["p0", "p1"]  # the even draw: every row once before repeats
    uniform = choose_rows(LoopSpec(rounds=2), {"code": 0.75, "prose": 0.25}, TRAIN, None, 8, seed=1)
    assert sorted(uniform["code"]) == sorted(TRAIN["code"]) and len(uniform["prose"]) == 2


def test_mismatch_criterion_ranks_by_disagreement():
    loop = LoopSpec(rounds=2, policy=["hard"], hard={"fraction": 1.0, "criterion": "top1_mismatch"})
    scores = {"c0": ("code", 4, 9.0, 0.0, 4.0), "c1": ("code", 4, 0.1, 0.0, 1.0)}
    chosen = choose_rows(loop, {"code": 1.0}, {"code": ["c0", "c1"]}, scores, 1, seed=0)
    assert chosen == {"code": ["c1"]}  # agrees on 1 of 4 tokens, though its KL is lower


def test_round_signals_hold_the_chosen_rows_with_repeats(tmp_path):
    src = _signals(tmp_path / "src")
    n = write_round_signals(src, ["p0", "p0", "c3"], tmp_path / "round")
    table = load_signals(tmp_path / "round", ["id", "split", "topk_ids", "domain"])
    assert n == 3 and table["id"].to_pylist() == ["p0", "p0", "c3"] and table["domain"].to_pylist() == ["prose", "prose", "code"]
    assert table["topk_ids"].to_pylist()[0] == [[2, 4], [3, 5]]
    with pytest.raises(ValueError, match="not in"):
        write_round_signals(src, ["nope"], tmp_path / "other")


def test_gaps_per_domain_are_token_weighted():
    gaps = gaps_of({"a": ("code", 2, 1.0, 2.0, 2.0), "b": ("code", 6, 1.0, 6.0, 0.0), "c": ("prose", 1, 0.5, 1.0, 1.0)})
    assert gaps["code"]["kl"] == pytest.approx(2.0 / 8) and gaps["code"]["top1_agreement"] == pytest.approx(0.25)
    assert gaps["prose"] == {"rows": 1, "tokens": 1, "kl": 0.5, "nll": 1.0, "top1_agreement": 1.0}


def test_loop_report_has_a_row_per_round_and_both_plots(tmp_path):
    history = [{"round": 0, "weights": {"a": 0.5, "b": 0.5}, "rows": 8},
               {"round": 1, "gaps": {"a": 0.9, "b": 0.3}, "weights": {"a": 0.7, "b": 0.3}, "rows": 8},
               {"round": 2, "gaps": {"a": 0.5, "b": 0.31}, "after_training": True}]
    write_loop_report(history, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | 0.9000 | 0.3000 | 0.700 | 0.300 | 8 |" in md and "| final | 0.5000 | 0.3100 |" in md
    assert (tmp_path / "gaps.png").stat().st_size > 1000 and (tmp_path / "weights.png").stat().st_size > 1000
    assert json.loads((tmp_path / "rounds.json").read_text()) == history


def test_loop_spec_checks(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    raw = {"teacher": {"model": "tiny:teacher"}, "student": {"model": "tiny:student"}, "data": {"path": str(corpus)},
           "runtime": {"run_dir": str(tmp_path / "run")}, "loop": {"rounds": 2, "policy": "ddk"}}
    with pytest.raises(SpecError) as err:
        spec_from_dict(raw)
    assert err.value.errors == ["data.domain_field: required with loop.policy ddk (it re-weights domains)"]
    raw["loop"]["policy"] = ["uniform", "ddk"]
    with pytest.raises(SpecError) as err:
        spec_from_dict(raw)
    assert any(e.startswith("loop:") and "does not combine" in e for e in err.value.errors)
    raw["loop"]["policy"] = "hard"  # hard alone needs no domains: one domain, replayed
    assert spec_from_dict(raw).loop.policies == {"hard"}
    assert spec_from_dict({**raw, "loop": None}).loop is None
