"""Drive ``raydistill run configs/tiny.yaml`` like a user and check what it leaves behind."""

import json
from pathlib import Path

import pytest

from raydistill.data.signals import load_signals

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_end_to_end_then_rerun_skips(tiny_run, tiny_spec, run_cli):
    args, proc, manifest = tiny_run
    run_dir = Path(tiny_spec.runtime.run_dir)
    assert {n: s["status"] for n, s in manifest["stages"].items()} == {s: "succeeded" for s in ("teacher", "train", "eval", "serve-check")}

    corpus_ids = [json.loads(l)["id"] for l in (ROOT / "configs/data/tiny_prompts.jsonl").read_text().splitlines() if l.strip()]
    signal_ids = load_signals(run_dir / "signals", columns=["id"])["id"].to_pylist()
    assert sorted(signal_ids) == sorted(corpus_ids)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run_dir / "student")
    AutoTokenizer.from_pretrained(run_dir / "student")
    assert list((run_dir / "student").glob("*.safetensors"))
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["student"]["nll"] > 0 and report["teacher"]["nll"] > 0
    answer = manifest["stages"]["serve-check"]["outputs"]
    assert answer["answer"] and answer["prompt"]
    assert (run_dir / "spec.yaml").exists()
    assert f"raydistill serve {run_dir}" in proc.stdout

    again = run_cli(args, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("already succeeded") == 4


def test_validate_lists_every_error(run_cli):
    proc = run_cli(["validate", "configs/tiny.yaml", "--set", "train.zero_stage=4", "--set", "distill.loss=l2", "--set", "data.path=/nope.jsonl"], timeout=120)
    assert proc.returncode == 2
    for key in ("train.zero_stage: 4", "distill.loss: 'l2'", "data.path: '/nope.jsonl'"):
        assert key in proc.stderr
    assert "Traceback" not in proc.stderr
