"""The teacher engine actor's handling of a dead engine, without Ray or an engine: bounded restarts, then rows fail with the cause."""

import asyncio
import json

import pytest

from raydistill.engine_dtype import DtypeChoice
from raydistill.teacher.engine import MAX_ENGINE_DEATHS, DtypeResolvingEngineUDF, read_reports


class DeadEngine:
    async def generate_async(self, row):
        from vllm.v1.engine.exceptions import EngineDeadError

        raise EngineDeadError()


def _actor(report_dir):
    """An engine actor as the library would leave it after start-up, with an engine that has died."""
    udf = object.__new__(DtypeResolvingEngineUDF)
    udf._dtype_key, udf._report_dir, udf._dead = "teacher.engine_args.dtype", report_dir, False
    udf._choice = DtypeChoice("bfloat16", "explicit", "set by teacher.engine_args.dtype", "teacher.engine_args.dtype", "node-a")
    udf.engine_kwargs = {"dtype": "bfloat16"}
    udf.llm = DeadEngine()
    udf._wrap_generate()
    return udf


def test_engine_deaths_restart_a_bounded_number_of_times_then_rows_fail_with_the_cause(tmp_path):
    from vllm.v1.engine.exceptions import EngineDeadError

    # The first deaths re-raise the library's fatal error: it exits the actor and Ray Data starts a fresh engine.
    for _ in range(MAX_ENGINE_DEATHS):
        with pytest.raises(EngineDeadError):
            asyncio.run(_actor(tmp_path).llm.generate_async({}))
    # One more death: no more restarts; each row fails with the likely cause and the key to change.
    last = _actor(tmp_path)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"teacher engine died: EngineDeadError\. The engine ran in bfloat16 \(teacher.engine_args.dtype\)"):
            asyncio.run(last.llm.generate_async({}))
    started, died = read_reports(str(tmp_path))
    assert started == [] and len(died) == MAX_ENGINE_DEATHS + 2
    assert sum(d["fatal"] for d in died) == 2 and all(d["node"] == "node-a" for d in died)
    assert all("SIGILL" in json.dumps(d["hint"]) for d in died)



@pytest.mark.parametrize(("overrides", "disabled", "exported"), [
    ([], True, False),
    (["teacher.engine_stats=true"], False, True),
    (["teacher.engine_args.disable_log_stats=false"], False, False),
])
def test_engine_stats_are_off_unless_the_spec_turns_them_on(overrides, disabled, exported):
    """teacher.engine_stats drives vLLM's stats and ray.data.llm's metrics export; an explicit engine_args entry wins."""
    from pathlib import Path

    from raydistill.spec import load_spec
    from raydistill.teacher.stage import _processor_config

    spec = load_spec(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml", overrides)
    config = _processor_config(spec.teacher, spec.teacher_pass, "/models/teacher", spec.teacher.engine_stats)
    assert config.engine_kwargs["disable_log_stats"] is disabled
    assert config.log_engine_metrics is exported


@pytest.mark.parametrize("bind, places, threads", [("0", "{0}", "1"), ("0-1", "{0,1}", "2")])
def test_a_single_cpu_worker_starts_inside_the_engine_core_with_the_bound_cores(monkeypatch, bind, places, threads):
    """At one bundle (ray.data.llm's ``uni``) on a CPU, the engine starts with multiprocessing of the worker off and
    the worker's OpenMP binding (vLLM's own, from ``cpu_threads_bind``) in the environment; the actor's is restored."""
    import os

    from raydistill.engine_process import single_worker_in_engine_core

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", bind)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("OMP_PLACES", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = dict(os.environ)
    with single_worker_in_engine_core({"distributed_executor_backend": "uni"}):
        inside = dict(os.environ)
    assert inside["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert (inside["OMP_PLACES"], inside["OMP_NUM_THREADS"], inside["OMP_PROC_BIND"]) == (places, threads, "true")
    assert dict(os.environ) == before

    with single_worker_in_engine_core({"distributed_executor_backend": "ray", "tensor_parallel_size": 2}):
        assert dict(os.environ) == before  # several workers: vLLM's executor sets each one's binding itself
