"""The student's model card: Hub front matter plus provenance and figures, built from the run directory."""

import json

import yaml

from raydistill.distill.init import PRUNE_INFO_FILE
from raydistill.distill.model_card import CARD_FILE, front_matter, teacher_facts, write_model_card
from raydistill.jobs.rundir import RunDir
from raydistill.spec import JobSpec


def _spec(run_dir, **student) -> JobSpec:
    corpus = run_dir.parent / "corpus.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    return JobSpec.model_validate({
        "teacher": {"model": "gemma3-270m"}, "student": student or {"model": "tiny:student"},
        "data": {"path": str(corpus)}, "runtime": {"run_dir": str(run_dir)},
        "distill": {"mode": "on_policy", "loss": "reverse_kl"}, "train": {"max_steps": 2},
    })


def _teacher(tmp_path, license_name="Gemma Terms of Use"):
    t = tmp_path / "teacher"
    t.mkdir()
    (t / "raydistill_builtin.json").write_text(json.dumps({"builtin": "gemma3-270m", "license": license_name}))
    return t


def test_card_has_hub_front_matter_and_the_runs_provenance(tmp_path):
    run = RunDir(tmp_path / "run")
    for d in (run.student, run.train, run.eval, run.student_init):
        d.mkdir(parents=True)
    run.manifest.write_text(json.dumps({"stages": {"teacher": {"inputs": {"corpus": "abc123"}}}}))
    (run.train / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2)))
    (run.student_init / PRUNE_INFO_FILE).write_text(json.dumps({"teacher": "t", "teacher_layers": 18, "kept_layers": [0, 5, 17]}))
    spec = _spec(run.root, init="prune_from_teacher", layers=[0, 5, 17])
    path = write_model_card(spec, run, str(_teacher(tmp_path)))
    text = path.read_text()
    assert path == run.student / CARD_FILE
    meta = front_matter(text)
    assert meta["base_model"] == "google/gemma-3-270m" and meta["license"] == "gemma"
    assert meta["pipeline_tag"] == "text-generation" and "on-policy-distillation" in meta["tags"]
    assert yaml.safe_load(text.split("---")[1]) == meta
    assert "fingerprint `abc123`" in text and "`reverse_kl`" in text and "2 optimizer steps" in text
    assert "layers [0, 5, 17] of 18" in text and "Not evaluated yet" in text

    (run.eval / "report.json").write_text(json.dumps({
        "eval_sequences": 3, "eval_tokens": 40, "kl_to_teacher": 0.5, "top1_agreement": 0.25,
        "student": {"perplexity": 12.0, "parameters": 10}, "teacher": {"perplexity": 6.0, "parameters": 30},
        "own_samples": {"reverse_kl": 0.7, "teacher_nll": 2.5}}))
    text = write_model_card(spec, run, str(tmp_path / "teacher")).read_text()
    assert "| perplexity on the teacher's text | 12.00 | 6.00 |" in text and "reverse KL to the teacher 0.7000" in text


def test_license_of_an_unknown_teacher_comes_from_its_card_or_is_other(tmp_path):
    t = tmp_path / "hf"
    t.mkdir()
    assert teacher_facts("/models/hf", str(t))["license"] == "other"
    (t / CARD_FILE).write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    assert teacher_facts("/models/hf", str(t)) == {"base_model": "/models/hf", "license": "apache-2.0", "license_name": None}
    assert teacher_facts("gemma3-270m", str(_teacher(tmp_path, "Custom Terms")))["license"] == "other"
