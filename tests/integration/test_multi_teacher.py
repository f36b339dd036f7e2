"""Several teachers on the tiny models, run as a user runs them: ``raydistill run configs/tiny_multi_teacher.yaml``.

* ensemble: killed in the second teacher's pass and re-run, then trained and evaluated; the
  stored signals are the weighted mixture of the two teachers' own signals, each id exactly once.
* domain: each row is written by the teacher of its domain, an unknown domain is rejected with its
  reason, and the report gives the KL per domain.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raydistill.data.signals import load_signals, read_signal_meta
from raydistill.teacher.ensemble import MASK_ID, mix_logprobs, mix_topk

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "raydistill")
SPEC = "configs/tiny_multi_teacher.yaml"
# Stored log-probs are within 1/scale (16) nats of the engine's, so two teachers' decoded signals
# mixed again differ from the stored mixture by at most about twice that.
STORED_TOL = 2.5 / 16


def _table(signals: Path, columns=("id", "input_ids", "target_start", "topk_ids", "topk_logprobs", "target_logprob")):
    return {r["id"]: r for r in load_signals(signals, list(columns)).to_pylist()}


def test_ensemble_killed_rerun_trained_and_evaluated(tmp_path, free_port):
    run_dir = tmp_path / "run"
    signals = run_dir / "signals"
    cmd = [CLI, "run", SPEC, "--stages", "teacher,train,eval", "--set", f"runtime.run_dir={run_dir}", "--set", f"serve.port={free_port}",
           "--set", "train.max_steps=4", "--set", "teacher_pass.shard_rows=8", "--set", "teacher_pass.sampling.max_tokens=12"]
    # Killed once the second teacher has written a shard: the first teacher's pass is complete by then.
    second = signals / "teachers" / "reasoner"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and not list(second.glob("*.parquet")):
            assert proc.poll() is None, "the teacher pass ended before it could be killed"
            time.sleep(0.2)
        assert list(second.glob("*.parquet")), "the second teacher wrote no shards within 15 minutes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(2)
    # The tiny scoring pass can finish between two polls. Keep the first half of its complete shards
    # (what a kill a little earlier leaves: a truncated shard is the single-teacher test's case) and
    # no mixture, so the re-run must score the rest and mix everything.
    shards = sorted(second.glob("*.parquet"))
    for extra in shards[len(shards) // 2:]:
        extra.unlink()
    for mixed in signals.glob("*.parquet"):
        mixed.unlink()
    kept = sum(pq.read_metadata(f).num_rows for f in second.glob("*.parquet"))

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    outputs = json.loads((run_dir / "manifest.json").read_text())["stages"]["teacher"]["outputs"]
    assert outputs["teachers"]["writer"]["resumed_rows"] == outputs["teachers"]["writer"]["rows"] == 64  # not redone
    assert outputs["teachers"]["reasoner"]["resumed_rows"] == kept < 64

    meta = read_signal_meta(signals)
    assert meta["routing"] == "ensemble"
    assert [(t["name"], t["model"], t["weight"]) for t in meta["teachers"]] == [("writer", "tiny:teacher", 2.0), ("reasoner", "tiny:teacher2", 1.0)]

    mixed, first, second_t = _table(signals), _table(signals / "teachers" / "writer"), _table(second)
    assert len(mixed) == outputs["rows"] == 64 and set(mixed) == set(first) == set(second_t)
    masked = 0
    for i, row in mixed.items():
        a, b = first[i], second_t[i]
        assert row["input_ids"] == a["input_ids"] == b["input_ids"]  # the second teacher scored the first one's tokens
        ids, lps = mix_topk([np.array(a["topk_ids"]), np.array(b["topk_ids"])], [np.array(a["topk_logprobs"]), np.array(b["topk_logprobs"])], [2.0, 1.0])
        stored_ids, stored_lps = np.array(row["topk_ids"]), np.array(row["topk_logprobs"])
        assert stored_ids.shape == ids.shape == (len(a["topk_ids"]), 16)  # the union, padded to k + k
        real = ids != MASK_ID
        assert (stored_ids == ids).all(), i
        np.testing.assert_allclose(stored_lps[real], lps[real], atol=STORED_TOL)
        assert not np.exp(stored_lps[~real]).any()
        masked += int((~real).sum())
        np.testing.assert_allclose(row["target_logprob"], mix_logprobs([a["target_logprob"], b["target_logprob"]], [2.0, 1.0]), atol=STORED_TOL)
    assert masked, "the two teachers never disagreed on a top-k list"

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert set(report["kl_by_teacher"]) == {"writer", "reasoner"}
    assert all(np.isfinite(v) and v > 0 for v in report["kl_by_teacher"].values())
    assert np.isfinite(report["kl_to_teacher"])
    assert (run_dir / "student" / "config.json").exists()
    card = (run_dir / "student" / "README.md").read_text()
    assert "**Teachers, routing ensemble:** tiny:teacher (`writer`, weight 2); tiny:teacher2 (`reasoner`, weight 1)" in card


def test_domain_routing_run_rejects_unknown_domains(tmp_path, free_port):
    corpus = tmp_path / "prompts.jsonl"
    lines = (ROOT / "configs/data/tiny_domains.jsonl").read_text().splitlines()
    lines += [json.dumps({"id": "odd-math", "prompt": "What is two plus two?", "domain": "math"}),
              json.dumps({"id": "odd-none", "prompt": "A row without a domain."})]
    corpus.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    teachers = '[{name: writer, model: "tiny:teacher", domains: [writing]}, {name: reasoner, model: "tiny:teacher2", domains: [reasoning]}]'
    sets = [f"runtime.run_dir={run_dir}", f"serve.port={free_port}", f"data.path={corpus}", "teacher_pass.routing=domain", f"teachers={teachers}",
            "train.max_steps=4", "teacher_pass.sampling.max_tokens=12"]
    args = [x for s in sets for x in ("--set", s)]

    # validate names the unknown domain, and where it is, before anything runs
    checked = subprocess.run([CLI, "validate", SPEC, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert checked.returncode == 2 and "'math'" in checked.stderr and f"{corpus}:65" in checked.stderr, checked.stderr

    # the run rejects those rows with the reason and goes on
    proc = subprocess.run([CLI, "run", SPEC, "--stages", "teacher,train,eval", *args], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    signals = run_dir / "signals"
    rejected = [json.loads(l) for l in (signals / "_rejected.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in rejected) == [f"{corpus}:65", f"{corpus}:66"]
    assert "domain 'math' has no teacher" in rejected[0]["reason"] and "data.domain_field" in rejected[1]["reason"]

    table = load_signals(signals, ["id", "teacher", "domain"])
    owner = {"writing": "writer", "reasoning": "reasoner"}
    want = {json.loads(l)["id"]: json.loads(l)["domain"] for l in lines[:64]}
    got = dict(zip(table["id"].to_pylist(), zip(table["teacher"].to_pylist(), table["domain"].to_pylist())))
    assert got == {i: (owner[d], d) for i, d in want.items()}
    assert read_signal_meta(signals)["routing"] == "domain"

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    eval_ids = [i for i, s in zip(load_signals(signals, ["id", "split"])["id"].to_pylist(), load_signals(signals, ["id", "split"])["split"].to_pylist()) if s == "eval"]
    domains = {want[i] for i in eval_ids}
    assert set(report["by_domain"]) == domains
    for d, figures in report["by_domain"].items():
        assert figures["teacher"] == owner[d]
        assert np.isfinite(figures["kl_to_teacher"]) and figures["eval_tokens"] > 0
    assert sum(f["eval_sequences"] for f in report["by_domain"].values()) == report["eval_sequences"]
