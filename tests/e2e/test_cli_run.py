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
    assert again.stdout.count("inputs unchanged") == 4 and "starting" not in again.stdout
    # Each stage records the spec fields it ran with and the fingerprint of its inputs.
    assert manifest["stages"]["train"]["spec"]["train.max_steps"] == tiny_spec.train.max_steps
    assert all(len(manifest["stages"][s]["fingerprint"]) == 16 for s in manifest["stages"])


def test_tiny_run_is_in_mlflow(tiny_run, tiny_spec):
    """The shared run tracks to the local store in RUN/mlruns: read back with MLflow's own client."""
    from raydistill.jobs.tracking import TAG_STUDENT, client

    proc = tiny_run[1]
    run_dir = Path(tiny_spec.runtime.run_dir)
    state = json.loads((run_dir / "mlflow.json").read_text())
    assert state["tracking_uri"] == (run_dir / "mlruns").resolve().as_uri() and state["experiment"] == "raydistill-e2e"
    assert f"==> tracking: MLflow run {state['run_id']} in experiment 'raydistill-e2e'" in proc.stdout
    mlflow = client(state["tracking_uri"])
    got = mlflow.get_run(state["run_id"])
    assert got.info.status == "FINISHED" and got.info.experiment_id == mlflow.get_experiment_by_name("raydistill-e2e").experiment_id
    assert got.data.params["train.max_steps"] == str(tiny_spec.train.max_steps) and got.data.params["distill.loss"] == "forward_kl"

    # Every optimizer step, once, as rank 0 logged it: the values of RUN/train/metrics.jsonl.
    steps = tiny_spec.train.max_steps
    history = sorted(mlflow.get_metric_history(state["run_id"], "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, steps + 1))
    records = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m.value for m in history] == pytest.approx([r["loss"] for r in records])
    assert len(mlflow.get_metric_history(state["run_id"], "train/lr")) == steps

    report = json.loads((run_dir / "eval" / "report.json").read_text())
    metrics = got.data.metrics
    assert metrics["eval.kl_to_teacher"] == pytest.approx(report["kl_to_teacher"])
    assert metrics["eval.student.nll"] == pytest.approx(report["student"]["nll"])
    assert metrics["eval.top1_agreement"] == pytest.approx(report["top1_agreement"])
    artifacts = {a.path for a in mlflow.list_artifacts(state["run_id"])} | {a.path for a in mlflow.list_artifacts(state["run_id"], "eval")}
    assert {"spec.yaml", "eval/report.md", "eval/report.json", "eval/comparison.png"} <= artifacts
    assert got.data.tags[TAG_STUDENT] == str((run_dir / "student").resolve())


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*"))}


def test_dry_run_prints_the_plan_and_changes_nothing(tiny_run, tiny_spec, run_cli):
    args = tiny_run[0]
    run_dir = Path(tiny_spec.runtime.run_dir)
    before = _mtimes(run_dir)
    proc = run_cli([*args, "--dry-run", "--set", "train.lr=0.0005"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {l.split()[0]: l.split(None, 2)[1:] for l in proc.stdout.splitlines() if l.startswith("  ")}
    assert lines["teacher"] == ["skip", "inputs unchanged"]
    assert lines["train"] == ["run", "inputs changed: train.lr"]
    assert lines["eval"][0] == lines["serve-check"][0] == "run"
    proc = run_cli([*args, "--dry-run", "--set", "teacher_pass.top_k=4"], timeout=300)
    assert proc.returncode == 0 and "teacher      run          inputs changed: teacher_pass.top_k" in proc.stdout, proc.stdout
    assert _mtimes(run_dir) == before


@pytest.fixture
def run_copy(tiny_run, tiny_spec, tmp_path):
    """The shared tiny run, copied, for tests that change it."""
    import shutil

    copy = tmp_path / "run-copy"
    shutil.copytree(tiny_spec.runtime.run_dir, copy)
    return tiny_run[0], copy


def _with_run_dir(args: list[str], run_dir: Path) -> list[str]:
    return [a if not a.startswith("runtime.run_dir=") else f"runtime.run_dir={run_dir}" for a in args]


def test_changed_corpus_and_top_k_rerun_the_teacher_with_only_the_new_ids(run_copy, run_cli, tmp_path):
    args, run_dir = run_copy
    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"new{i}", "prompt": p}) + "\n" for i, p in enumerate(["hi", "A calm lake.", "Old roads."])))
    proc = run_cli([*_with_run_dir(args, run_dir), "--set", f"data.path={corpus}", "--set", "teacher_pass.top_k=4", "--stages", "teacher"],
                   timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "inputs changed: corpus, data.path, teacher_pass.top_k" in proc.stdout and "==> [teacher] succeeded" in proc.stdout
    signals = load_signals(run_dir / "signals", columns=["id", "topk_ids"])
    assert sorted(signals["id"].to_pylist()) == ["new0", "new1", "new2"]
    assert {len(ids) for row in signals["topk_ids"].to_pylist() for ids in row} == {4}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {s: manifest["stages"][s]["status"] for s in ("train", "eval", "serve-check")} == dict.fromkeys(("train", "eval", "serve-check"), "stale")


def test_a_second_run_on_the_same_directory_fails_at_once(run_copy, run_cli, run_lock_holder):
    args, run_dir = run_copy
    holder = run_lock_holder(run_dir)
    proc = run_cli([*_with_run_dir(args, run_dir), "--force", "eval"], timeout=120)
    assert proc.returncode == 1 and f"is in use by another raydistill run (pid {holder.pid} " in proc.stderr, proc.stderr


ON_POLICY = ["distill.mode=on_policy", "distill.loss=reverse_kl", "distill.on_policy.lmbda=0.5", "distill.on_policy.max_tokens=16",
             "distill.on_policy.sync_every=2"]
# The re-run's eval scores only: its vLLM generation runs (two engine starts) are checked on the shared run.
EVAL_SCORING_ONLY = ["eval.measure_speed=false", "eval.side_by_side=0", "eval.own_samples=0"]


def test_on_policy_run_records_rollouts_policy_versions_and_phase_times(run_copy, run_cli, tiny_spec):
    """GKD on the tiny job: the teacher pass is reused; training mixes rollouts (seeded plan: steps 2, 5, 6 of 6) with offline batches.

    It is also the suite's re-run of a changed training spec (one run serves both checks: each costs
    minutes on 2 cores): train, eval and serve-check run again, the teacher does not, and the old
    student's checkpoints are cleared rather than resumed from."""
    from raydistill.onpolicy.loop import load_rollouts, on_policy_plan

    args, run_dir = run_copy
    offline_shards = {p.name: p.stat().st_mtime_ns for p in (run_dir / "signals").glob("*.parquet")}
    proc = run_cli([*_with_run_dir(args, run_dir), *(x for o in ON_POLICY + EVAL_SCORING_ONLY for x in ("--set", o))], timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "==> [teacher] starting" not in proc.stdout
    for stage in ("train", "eval", "serve-check"):
        assert f"==> [{stage}] starting" in proc.stdout and f"==> [{stage}] succeeded" in proc.stdout
    assert f"clearing {run_dir / 'checkpoints'}" in proc.stdout  # the old student's checkpoints are never resumed from
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "succeeded" for s in ("teacher", "train", "eval", "serve-check"))
    assert manifest["stages"]["train"]["spec"]["distill.mode"] == "on_policy" and manifest["stages"]["train"]["runs"] == 2
    assert manifest["stages"]["eval"]["runs"] == 2 and manifest["stages"]["teacher"]["runs"] == 1
    assert offline_shards and {p.name: p.stat().st_mtime_ns for p in (run_dir / "signals").glob("*.parquet")} == offline_shards
    out = manifest["stages"]["train"]["outputs"]["on_policy"]
    steps = tiny_spec.train.max_steps
    on_steps = [s for s in range(1, steps + 1) if on_policy_plan(0, 0.5, s, 1)[0]]
    assert 0 < len(on_steps) < steps and out["on_policy_steps"] == len(on_steps)
    assert out["max_staleness"] < 2 and out["sync_every"] == 2
    assert all(out["phase_seconds"][p] > 0 for p in ("rollout_s", "score_s", "sync_s", "train_s"))

    rollouts = load_rollouts(run_dir / "signals" / "on_policy")
    assert rollouts.num_rows == out["rollouts"] > 0
    assert sorted(set(rollouts["step"].to_pylist())) == on_steps
    # Each rollout was sampled by the weights of the last sync before its step: at most sync_every steps stale.
    for step, version in zip(rollouts["step"].to_pylist(), rollouts["policy_version"].to_pylist()):
        assert version == 2 * ((step - 1) // 2) and 0 <= step - 1 - version < 2
    assert sorted(set(rollouts["policy_version"].to_pylist())) == out["policy_versions"]
    for ids, start, topk, tl in zip(*(rollouts[c].to_pylist() for c in ("input_ids", "target_start", "topk_ids", "target_logprob"))):
        assert 0 < len(ids) - start <= 16 and len(topk) == len(tl) == len(ids) - start
    metrics = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["rollouts"]] == on_steps
    # The offline signals are untouched and still read without the rollouts.
    assert len(load_signals(run_dir / "signals", columns=["id"])) == manifest["stages"]["teacher"]["outputs"]["rows"]
