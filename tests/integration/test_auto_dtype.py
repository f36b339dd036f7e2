"""``dtype: auto`` with the real vLLM engines: chosen on the engine's node, recorded, and safe on a short first row.

The serve path (first request "hi", the dtype in ``serve --status``) is in test_serve.py.
"""

import json
import sys
from pathlib import Path

import pytest

from raydistill import engine_dtype

pytestmark = pytest.mark.integration

SHORT_FIRST = ["hi", "Describe the quiet forest by the river.", "What does the old town remember?", "x"]


def test_teacher_pass_auto_dtype_on_a_short_first_row(ray_local, tiny_spec, model_paths, tmp_path):
    """No dtype in the spec, a corpus that starts with "hi": the engine runs the dtype proven on its node."""
    from raydistill.teacher.stage import run_teacher_stage

    corpus = tmp_path / "short_first.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate(SHORT_FIRST)))
    teacher = tiny_spec.teacher.model_copy(update={"engine_args": {"max_model_len": 512, "enforce_eager": True}})
    data = tiny_spec.data.model_copy(update={"path": str(corpus), "eval_fraction": 0.0})
    tp = tiny_spec.teacher_pass.model_copy(update={"sampling": tiny_spec.teacher_pass.sampling.model_copy(update={"max_tokens": 4})})
    out = run_teacher_stage(data, teacher, tp, model_paths[0], str(tmp_path / "signals"))

    assert out["rows"] == len(SHORT_FIRST) and out["rejected_rows"] == 0
    # The verdict the engine's node reached (this machine: the same cache the engine actor used).
    verdict = engine_dtype.bf16_verdict()
    expected = "bfloat16" if verdict["bf16"] else "float32"
    record = out["engine_dtype"]
    assert record["dtype"] == expected and record["source"] == "auto" and record["key"] == "teacher.engine_args.dtype"
    assert all(n["dtype"] == expected for n in record["nodes"].values()), record
    # The one worker ran inside the engine-core process, as ray.data.llm asks at one bundle: vLLM's CPU
    # platform would have turned "uni" into its multiprocess executor ("mp") without the start-up environment.
    assert all(n["executor"] == "uni" for n in record["nodes"].values()), record
    assert not (tmp_path / "signals" / "_engines").exists()  # merged into the outputs, not left among the shards


def test_refused_bf16_runs_float32_in_the_report_engines(ray_local, model_paths, tmp_path):
    """The self-test fails on purpose (a child that dies with SIGILL, as on Intel AMX machines) on the
    engine's node; the report's generation then runs float32 there and answers a short first prompt."""
    from raydistill.eval.report import generation_runs

    cache = tmp_path / "node-cache"
    env = {"RAYDISTILL_CACHE": str(cache), "VLLM_CPU_KVCACHE_SPACE": "1"}

    def fail_selftest() -> dict:
        import signal

        return engine_dtype.bf16_verdict(command=[sys.executable, "-c", f"import os; os.kill(os.getpid(), {int(signal.SIGILL)})"])

    import ray

    refused = ray.get(ray.remote(num_cpus=0, runtime_env={"env_vars": env})(fail_selftest).remote())
    assert refused["bf16"] is False and "SIGILL" in refused["detail"]

    runs = generation_runs({"student": model_paths[1]}, {"max_model_len": 512, "enforce_eager": True}, env,
                           prompts=SHORT_FIRST, side_by_side=2, max_tokens=4)
    student = runs["student"]
    assert student["engine_dtype"]["dtype"] == "float32" and student["engine_dtype"]["source"] == "auto"
    assert "self-test failed" in student["engine_dtype"]["reason"] and "SIGILL" in student["engine_dtype"]["reason"]
    assert len(student["answers"]) == 2 and student["tokens"] == 4 * len(SHORT_FIRST)
    assert list(Path(cache, "engine-dtype").glob("*.json"))  # the refusal was cached on that node, not asked of the driver
