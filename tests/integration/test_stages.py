"""Each stage's output in the shared tiny run (tests/conftest.py ``tiny_run``): the tiny models on a
local Ray with the real vLLM, DeepSpeed and Serve."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raydistill.data.entropy import TAIL_LOGIT_SCALE
from raydistill.data.signals import LOGPROB_SCALE, SIGNAL_SCHEMA, load_signals, read_signal_meta, tokenizer_fingerprint

pytestmark = pytest.mark.integration
# Stored log-probs come back within 1 / LOGPROB_SCALE nats of the engine's (half a step of
# quantization plus the shift that restores the stored tail), plus the tail's own rounding (half a step
# of its logit at most), and the tail is kept positive, so it is never below zero beyond float32 rounding.
TAIL_TOL = 1e-6
LP_TOL = 1.0 / LOGPROB_SCALE + 0.5 / TAIL_LOGIT_SCALE + 2e-3


def _signals(signals_dir):
    return load_signals(signals_dir)


def _corpus_rows(spec):
    return [json.loads(line) for line in Path(spec.data.path).read_text().splitlines() if line.strip()]


def test_teacher_stage_writes_one_exact_row_per_prompt(teacher_run, tiny_spec, model_paths):
    from transformers import AutoTokenizer

    table = _signals(teacher_run["signals_dir"])
    assert table.schema == SIGNAL_SCHEMA
    corpus = {r["id"]: r["prompt"] for r in _corpus_rows(tiny_spec)}
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(corpus) and teacher_run["rows"] == len(corpus)

    tok = AutoTokenizer.from_pretrained(model_paths[0])
    k = tiny_spec.teacher_pass.top_k
    for row in table.to_pylist():
        start = row["target_start"]
        # The prompt ids are the teacher tokenizer's own encoding of the prompt text (BOS first).
        assert row["input_ids"][:start] == tok(corpus[row["id"]]).input_ids
        assert row["input_ids"][0] == tok.bos_token_id
        n_targets = len(row["input_ids"]) - start
        # The engine does not detokenize; the sink decodes the generated ids once, as vLLM would.
        assert row["response"] == tok.decode(row["input_ids"][start:], skip_special_tokens=True)
        assert 1 <= n_targets <= tiny_spec.teacher_pass.sampling.max_tokens
        assert len(row["topk_ids"]) == len(row["topk_logprobs"]) == n_targets
        for ids_t, lps_t in zip(row["topk_ids"], row["topk_logprobs"]):
            assert len(ids_t) == len(lps_t) == k and len(set(ids_t)) == k
            assert lps_t == sorted(lps_t, reverse=True)
            tail = 1.0 - float(np.exp(np.asarray(lps_t, dtype=np.float64)).sum())
            assert -TAIL_TOL <= tail <= 1.0

    meta = read_signal_meta(teacher_run["signals_dir"])
    assert meta["top_k"] == k and meta["mode"] == "generate"
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)


def test_teacher_logprobs_agree_with_transformers(teacher_run, model_paths):
    """vLLM's stored log-probs equal the teacher's own transformers log-probs at the same positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_paths[0], dtype=torch.float32).eval()
    rows = _signals(teacher_run["signals_dir"]).to_pylist()[:4]
    for row in rows:
        start = row["target_start"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0].double(), -1)
        for j, (ids_t, lps_t) in enumerate(zip(row["topk_ids"], row["topk_logprobs"])):
            ref = logp[start + j - 1, ids_t].numpy()
            np.testing.assert_allclose(lps_t, ref, atol=LP_TOL)


def test_train_stage_exports_loadable_student(train_run, tiny_spec, model_paths):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_dir = Path(train_run["student_dir"])
    assert (student_dir / "config.json").exists() and (student_dir / "model.safetensors").exists()
    assert (student_dir / "tokenizer.json").exists()
    trained = AutoModelForCausalLM.from_pretrained(student_dir)
    initial = AutoModelForCausalLM.from_pretrained(model_paths[1])
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, initial.state_dict()[n])]
    assert changed, "training did not change any weight"
    tok = AutoTokenizer.from_pretrained(student_dir)
    assert tok("the river").input_ids == AutoTokenizer.from_pretrained(model_paths[0])("the river").input_ids

    metrics = [json.loads(l) for l in Path(train_run["metrics"]).read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, tiny_spec.train.max_steps + 1))
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["kd"] >= 0 and m["ce"] > 0
        assert m["loss"] == pytest.approx((1 - tiny_spec.distill.ce_weight) * m["kd"] + tiny_spec.distill.ce_weight * m["ce"], rel=1e-4)
    ds_config = json.loads((Path(tiny_spec.runtime.run_dir) / "train" / "deepspeed.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 2


def test_student_has_a_model_card_with_provenance_and_the_eval_figures(tiny_run, train_run, tiny_spec):
    from raydistill.distill.model_card import front_matter

    card = (Path(train_run["student_dir"]) / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == tiny_spec.teacher.model and meta["pipeline_tag"] == "text-generation" and meta["license"] == "other"
    assert f"{tiny_spec.train.max_steps} optimizer steps" in card and f"`{tiny_spec.distill.loss}`" in card
    assert "perplexity on the teacher's text" in card  # the eval stage rewrote it with the report's figures


def test_eval_stage_scores_student_and_teacher(tiny_run, train_run, tiny_spec, model_paths, teacher_run):
    from transformers import AutoModelForCausalLM

    out = tiny_run[2]["stages"]["eval"]["outputs"]
    report = json.loads(Path(out["report"]).read_text())
    assert out["kl_to_teacher"] == report["kl_to_teacher"]
    assert report["eval_sequences"] == teacher_run["eval_rows"] > 0
    # The teacher sampled these responses itself, so it must explain them better than a barely trained student.
    assert report["teacher"]["nll"] < report["student"]["nll"]
    assert report["kl_to_teacher"] > 0 and 0 <= report["top1_agreement"] <= 1
    for who, path in (("student", train_run["student_dir"]), ("teacher", model_paths[0])):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
        assert report[who]["parameters"] == n_params
        assert report[who]["tokens_per_s"] > 0 and report[who]["speed_tokens"] == tiny_spec.eval.speed_tokens * min(tiny_spec.eval.speed_prompts, report["eval_sequences"])
    assert len(report["side_by_side"]) == min(tiny_spec.eval.side_by_side, report["eval_sequences"])
    # The quality figures: the perplexity ratio, and repetition in both models' greedy answers.
    from raydistill.eval.report import repetition_figures

    assert out["ppl_ratio"] == report["ppl_ratio"] and math.isclose(report["ppl_ratio"], report["student"]["perplexity"] / report["teacher"]["perplexity"], rel_tol=1e-9)
    rep = repetition_figures(report["side_by_side"])
    assert (report["student"]["distinct4"], report["teacher"]["distinct4"], report.get("distinct4_ratio")) == \
        (rep["student_distinct4"], rep["teacher_distinct4"], rep["distinct4_ratio"])
    # The held-out teacher responses that echo their prompt, recounted from the signals.
    import pyarrow.compute as pc

    from raydistill.data.signals import load_signals
    from raydistill.eval.report import prompt_repeat_figures

    held = load_signals(Path(out["report"]).parent.parent / "signals", columns=["prompt", "response", "split"])
    held = held.filter(pc.equal(held["split"], "eval"))
    assert report["teacher_prompt_repeats"] == prompt_repeat_figures(held["prompt"].to_pylist(), held["response"].to_pylist())["teacher_prompt_repeats"]
    eval_dir = Path(out["report"]).parent
    for png in ("loss_curve.png", "comparison.png"):
        assert (eval_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (eval_dir / "report.md").read_text()
    assert "Top-1 agreement" in md and "![training loss](loss_curve.png)" in md and report["side_by_side"][0]["prompt"] in md
    assert f"**Teacher responses that repeat their prompt** (6 words of it or more): {report['teacher_prompt_repeats']} of" in md
    # configs/tiny.yaml names the teacher's dtype, and the report's engines run what it names.
    for who in ("student", "teacher"):
        assert (out["engine_dtype"][who]["dtype"], out["engine_dtype"][who]["source"]) == ("float32", "explicit")
    assert "| vLLM engine dtype | float32 | float32 |" in md


def test_eval_scores_the_students_own_samples_with_the_teacher(tiny_run, train_run, tiny_spec, model_paths):
    """The own-sample figures recomputed with transformers from the recorded samples: both models' log-probs of each token."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tiny_run[2]["stages"]["eval"]["outputs"]
    own = out["own_samples"]
    rows = [json.loads(l) for l in (Path(out["report"]).parent / "own_samples.jsonl").read_text().splitlines()]
    assert own["prompts"] == len(rows) == min(tiny_spec.eval.own_samples, json.loads(Path(out["report"]).read_text())["eval_sequences"])
    assert own["tokens"] == sum(len(r["response_ids"]) for r in rows) > 0
    assert all(0 < len(r["response_ids"]) <= tiny_spec.eval.own_sample_tokens for r in rows)
    models = {w: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for w, p in (("student", train_run["student_dir"]), ("teacher", model_paths[0]))}
    lq, lp = [], []
    for r in rows:
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        start = len(r["prompt_ids"])
        for who, acc in (("student", lq), ("teacher", lp)):
            with torch.no_grad():
                logp = torch.log_softmax(models[who](ids).logits[0].double(), -1)
            acc += logp[start - 1 : -1].gather(-1, ids[0, start:, None]).squeeze(-1).tolist()
        assert r["response_logprobs"] == pytest.approx(lq[-len(r["response_ids"]):], abs=1e-3)
        assert r["teacher_logprobs"] == pytest.approx(lp[-len(r["response_ids"]):], abs=1e-3)
    assert own["reverse_kl"] == pytest.approx(float(np.mean(np.array(lq) - np.array(lp))), abs=1e-3)
    assert own["teacher_nll"] == pytest.approx(-float(np.mean(lp)), abs=1e-3)
    assert "On the student's own samples" in (Path(out["report"]).parent / "report.md").read_text()


def test_teacher_stage_records_the_engine_dtype(teacher_run):
    assert (teacher_run["engine_dtype"]["dtype"], teacher_run["engine_dtype"]["source"]) == ("float32", "explicit")


def test_serve_check_answers_a_completion(tiny_run, tiny_spec):
    out = tiny_run[2]["stages"]["serve-check"]["outputs"]
    assert out["model"] == tiny_spec.model_id and isinstance(out["answer"], str) and out["answer"]
    assert out["url"] == f"http://127.0.0.1:{tiny_spec.serve.port}/{out['app']}/v1/completions"
    assert out["usage"]["completion_tokens"] >= 1
    # configs/tiny.yaml gives serving no dtype: the replica chose from the bf16 self-test on its node.
    from raydistill.engine_dtype import bf16_verdict

    assert out["engine_dtype"]["source"] == "auto"
    assert out["engine_dtype"]["dtype"] == ("bfloat16" if bf16_verdict()["bf16"] else "float32")
