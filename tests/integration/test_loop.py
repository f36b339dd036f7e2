"""Two teachers routed by domain, under the adaptive loop: one tiny run, as a user runs it (``raydistill run configs/tiny_loop.yaml``).

Domain routing: each row is written by the teacher of its domain, rows with an unknown or no domain are
rejected with the reason (and ``validate`` names them first). The loop: 2 rounds with ``ddk`` and
``expand``, killed in the second round's training and re-run; the first round is not redone, the
weights move toward the domain with the larger gap, and the gaps land in the manifest and the loop's
report. ``expand``: each domain's teacher writes new prompts from the hardest rows; they carry
``parent_id`` and ``round``, go through the teacher pass's bad-row handling, and train in round 1.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from raydistill.data.signals import load_signals, read_signal_meta

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "raydistill")
SPEC = "configs/tiny_loop.yaml"
TEACHERS = '[{name: writer, model: "tiny:teacher", domains: [writing]}, {name: reasoner, model: "tiny:teacher2", domains: [reasoning]}]'


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)  # into the round's training, once it started
    return True


def _entries(manifest: Path) -> dict:
    return json.loads(manifest.read_text())["stages"]


def test_domain_routed_teachers_under_a_killed_and_resumed_ddk_loop(tmp_path, free_port, kill_when):
    corpus = tmp_path / "prompts.jsonl"
    lines = (ROOT / "configs/data/tiny_domains.jsonl").read_text().splitlines()
    lines += [json.dumps({"id": "odd-math", "prompt": "What is two plus two?", "domain": "math"}),
              json.dumps({"id": "odd-none", "prompt": "A row without a domain."})]
    corpus.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    sets = [f"runtime.run_dir={run_dir}", f"serve.port={free_port}", f"data.path={corpus}", "teacher=null", f"teachers={TEACHERS}",
            "teacher_pass.routing=domain", "teacher_pass.sampling.max_tokens=12", "loop.rounds=2", "loop.policy=[ddk, expand]",
            "loop.ddk.temperature=0.05", "loop.expand.seeds=4", "loop.expand.per_seed=2", "loop.expand.shots=3", "loop.expand.max_tokens=12",
            # One trainer process per round: the loop is under test here, ZeRO's multi-worker training and resume elsewhere.
            "train.workers=1", "train.zero_stage=0"]
    args = [x for s in sets for x in ("--set", s)]

    # validate names the unknown domain, and where it is, before anything runs
    checked = subprocess.run([CLI, "validate", SPEC, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 2 and "'math'" in checked.stderr and f"{corpus}:65" in checked.stderr, checked.stderr

    # killed while the second round trains
    cmd = [CLI, "run", SPEC, "--stages", "teacher,train,eval", *args]
    second = run_dir / "rounds" / "1" / "manifest.json"
    kill_when(cmd, lambda: second.exists() and _entries(second).get("train", {}).get("status") == "running" and _sleep(5),
              "its second round trained", 1200)
    first_round = _entries(run_dir / "rounds" / "0" / "manifest.json")["train"]
    assert first_round["status"] == "succeeded"
    chosen = _entries(second)["select"]
    expanded = _entries(second)["expand"]
    assert expanded["status"] == "succeeded"

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert _entries(run_dir / "rounds" / "0" / "manifest.json")["train"] == first_round  # not redone
    assert _entries(second)["select"] == chosen and _entries(second)["expand"] == expanded and _entries(second)["train"]["status"] == "succeeded"

    # domain routing: the teacher of each row's domain wrote it; the others were rejected with the reason
    signals = run_dir / "signals"
    rejected = [json.loads(l) for l in (signals / "_rejected.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rejected) == [f"{corpus}:65", f"{corpus}:66"]
    assert "domain 'math' has no teacher" in rejected[0]["reason"] and "data.domain_field" in rejected[1]["reason"]
    table = load_signals(signals, ["id", "split", "teacher", "domain"])
    owner = {"writing": "writer", "reasoning": "reasoner"}
    want = {json.loads(l)["id"]: json.loads(l)["domain"] for l in lines[:64]}
    got = dict(zip(table["id"].to_pylist(), zip(table["teacher"].to_pylist(), table["domain"].to_pylist())))
    assert got == {i: (owner[d], d) for i, d in want.items()}
    meta = read_signal_meta(signals)
    assert meta["routing"] == "domain" and [(t["name"], t["domains"]) for t in meta["teachers"]] == [("writer", ["writing"]), ("reasoner", ["reasoning"])]

    # the loop: the gaps and weights of each round in the manifest; ddk moved weight to the larger gap
    outputs = _entries(run_dir / "manifest.json")["train"]["outputs"]
    rounds = outputs["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["after_training"]
    prior, measured, new = rounds[0]["weights"], rounds[1]["gaps"], rounds[1]["weights"]
    assert set(measured) == set(new) == {"writing", "reasoning"}
    assert all(np.isfinite(v) and v > 0 for v in measured.values())
    wider = max(measured, key=measured.get)
    assert new[wider] > prior[wider] and abs(sum(new.values()) - 1) < 1e-9
    assert rounds[1]["rows"] == sum(rounds[1]["rows_by_domain"].values())
    assert (run_dir / "rounds" / "report.md").read_text().count("\n| ") == 4  # the header, rounds 0 and 1, the final student
    assert (run_dir / "rounds" / "gaps.png").exists() and (run_dir / "rounds" / "weights.png").exists()
    assert (run_dir / "student" / "config.json").exists() and outputs["student_dir"] == str(run_dir / "student")

    # expand: the new rows name their parent (a training row of their domain) and round, and each either has
    # signals, written by its domain's teacher, or is a rejected row with its reason; the good ones train in round 1
    exp = run_dir / "rounds" / "1" / "expand"
    written = [json.loads(l) for l in (exp / "prompts.jsonl").read_text().splitlines()]
    facts = expanded["outputs"]
    assert facts["seeds"] == 4 and facts["written"] == len(written) == 8
    train_domain = {i: d for i, d, s in zip(table["id"].to_pylist(), table["domain"].to_pylist(), table["split"].to_pylist()) if s == "train"}
    assert all(w["round"] == 1 and train_domain[w["parent_id"]] == w["domain"] for w in written)
    new = load_signals(exp / "signals", ["id", "teacher", "domain"])
    new_rejected = [json.loads(l) for l in (exp / "signals" / "_rejected.jsonl").read_text().splitlines()] if (exp / "signals" / "_rejected.jsonl").exists() else []
    line_of = {f"{exp / 'prompts.jsonl'}:{n + 1}": w["id"] for n, w in enumerate(written)}
    assert all(r["reason"] for r in new_rejected)
    assert sorted(new["id"].to_pylist() + [line_of[r["source"]] for r in new_rejected]) == sorted(w["id"] for w in written)
    assert facts["rows"] == new.num_rows and facts["rejected"] == len(new_rejected)
    assert all(owner[d] == t for t, d in zip(new["teacher"].to_pylist(), new["domain"].to_pylist()))
    by_id = {w["id"]: w for w in written}
    trained = load_signals(run_dir / "rounds" / "1" / "signals", ["id", "parent_id", "round"])
    taken = [(i, p, r) for i, p, r in zip(*(trained[c].to_pylist() for c in ("id", "parent_id", "round"))) if p is not None]
    assert len(taken) == chosen["outputs"]["new_rows"] and all(p == by_id[i]["parent_id"] and r == 1 for i, p, r in taken)
    assert taken or not new.num_rows

    # the report: held-out figures per domain, each against its own teacher's signals
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    eval_domains = {d for d, s in zip(table["domain"].to_pylist(), table["split"].to_pylist()) if s == "eval"}
    assert set(report["by_domain"]) == eval_domains
    for d, figures in report["by_domain"].items():
        assert figures["teacher"] == owner[d] and np.isfinite(figures["kl_to_teacher"]) and figures["eval_tokens"] > 0
    assert sum(f["eval_sequences"] for f in report["by_domain"].values()) == report["eval_sequences"]
