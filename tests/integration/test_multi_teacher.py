"""Several teachers on the tiny models, run as a user runs them: ``raydistill run configs/tiny_multi_teacher.yaml``.

The ensemble is killed in the second teacher's pass and re-run, then trained and evaluated; the
stored signals are the weighted mixture of the two teachers' own signals, each id exactly once.
Domain routing runs in tests/integration/test_loop.py, with the adaptive loop on top (one run for both).
"""

import json
import subprocess
import sys
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


def test_ensemble_killed_rerun_trained_and_evaluated(tmp_path, free_port, kill_when):
    run_dir = tmp_path / "run"
    signals = run_dir / "signals"
    cmd = [CLI, "run", SPEC, "--stages", "teacher,train,eval", "--set", f"runtime.run_dir={run_dir}", "--set", f"serve.port={free_port}",
           "--set", "train.max_steps=4", "--set", "teacher_pass.shard_rows=8", "--set", "teacher_pass.sampling.max_tokens=12"]
    # Killed once the second teacher has written a shard: the first teacher's pass is complete by then.
    second = signals / "teachers" / "reasoner"
    kill_when(cmd, lambda: bool(list(second.glob("*.parquet"))), "the second teacher wrote a shard", 900)
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
    assert report["by_domain"] and set(report["by_domain"]) <= {"writing", "reasoning"}  # the corpus has data.domain_field: the mixture keeps each row's domain
    assert (run_dir / "student" / "config.json").exists()
    card = (run_dir / "student" / "README.md").read_text()
    assert "**Teachers, routing ensemble:** tiny:teacher (`writer`, weight 2); tiny:teacher2 (`reasoner`, weight 1)" in card
