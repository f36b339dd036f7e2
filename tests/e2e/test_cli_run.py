"""Drive ``raydistill run configs/tiny.yaml`` like a user and check what it leaves behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

from raydistill.data.signals import load_signals
import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "raydistill")


def _run(args, timeout):
    return subprocess.run([CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def test_tiny_run_end_to_end_then_rerun_skips(tmp_path, free_port):
    run_dir = tmp_path / "run"
    args = ["run", "configs/tiny.yaml", "--set", f"runtime.run_dir={run_dir}", "--set", f"serve.port={free_port}"]
    proc = _run(args, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())
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

    again = _run(args, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("already succeeded") == 4


def test_validate_lists_every_error():
    proc = _run(["validate", "configs/tiny.yaml", "--set", "train.zero_stage=4", "--set", "distill.loss=l2", "--set", "data.path=/nope.jsonl"], timeout=120)
    assert proc.returncode == 2
    for key in ("train.zero_stage: 4", "distill.loss: 'l2'", "data.path: '/nope.jsonl'"):
        assert key in proc.stderr
    assert "Traceback" not in proc.stderr
