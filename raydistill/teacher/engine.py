"""ray.data.llm's vLLM engine stage, with the engine's dtype chosen inside the engine's actor.

What the library lacked (ray 2.60): its engine kwargs are fixed on the driver, but whether
vLLM-CPU's bf16 path works is a property of the node an engine lands on
(``raydistill.engine_dtype``). ``DtypeResolvingEngineUDF`` resolves the dtype in the actor
before the engine starts, reports the choice to the run's signals directory, and turns a dead
engine into an error that says why instead of a restart loop. Everything else is the library's
``vLLMEngineStageUDF`` unchanged; ``install`` swaps it into a built processor.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF
from ray.llm._internal.common.errors import VLLM_FATAL_ERRORS

from raydistill import engine_dtype
from raydistill.fileio import write_atomic

# Engine deaths tolerated across the pool before rows fail with the cause instead: ray.data.llm
# restarts a dead engine's actor forever, so an engine that dies on every start hangs a pass.
MAX_ENGINE_DEATHS = 2


class DtypeResolvingEngineUDF(vLLMEngineStageUDF):
    def __init__(self, *args: Any, dtype_key: str, report_dir: str, **kwargs: Any):
        self._dtype_key, self._report_dir = dtype_key, Path(report_dir)
        self._choice: engine_dtype.DtypeChoice | None = None
        self._dead = False
        try:
            super().__init__(*args, **kwargs)
        except Exception as err:
            raise RuntimeError(f"the teacher's vLLM engine failed to start: {type(err).__name__}: {err}\n"
                               f"{engine_dtype.death_hint(getattr(self, 'engine_kwargs', {}), dtype_key)}") from err
        self._report({"event": "started", **self._choice.as_dict()})
        self._wrap_generate()

    def normalize_engine_kwargs(self, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
        # Called by the library's __init__ before it starts the engine: the one place to set the dtype.
        kwargs, self._choice = engine_dtype.resolve(super().normalize_engine_kwargs(engine_kwargs), self._dtype_key)
        return kwargs

    def _report(self, record: dict) -> Path:
        self._report_dir.mkdir(parents=True, exist_ok=True)
        path = self._report_dir / f"{record['event']}-{uuid.uuid4().hex}.json"
        write_atomic(path, json.dumps(record))
        return path

    def _wrap_generate(self) -> None:
        generate = self.llm.generate_async

        async def generate_async(row: dict[str, Any]):
            try:
                return await generate(row)
            except VLLM_FATAL_ERRORS as err:
                hint = engine_dtype.death_hint(self.engine_kwargs, self._dtype_key)
                if not self._dead:
                    self._dead = True
                    fatal = len(list(self._report_dir.glob("died-*.json"))) + 1 > MAX_ENGINE_DEATHS
                    self._report({"event": "died", "error": f"{type(err).__name__}: {err}", "hint": hint, "fatal": fatal, **self._choice.as_dict()})
                    if not fatal:
                        raise  # the library exits this actor and Ray Data starts a fresh engine
                else:
                    self._report({"event": "died", "error": "a row after the engine died", "hint": hint, "fatal": True, **self._choice.as_dict()})
                # Not fatal to the library: the row is rejected with the cause, and the stage fails after the pass.
                raise RuntimeError(f"teacher engine died: {type(err).__name__}. {hint}") from err

        self.llm.generate_async = generate_async


def install(processor, dtype_key: str, report_dir: str) -> None:
    """Make ``processor``'s vLLM engine stage run ``DtypeResolvingEngineUDF``.

    A copy of the stage, not an assignment: the stage validates on assignment and would re-run its
    set-up, which has already consumed the placement-group config (the engine would then ask for a GPU).
    """
    name = "vLLMEngineStage"
    stage = processor.get_stage_by_name(name)
    kwargs = {**stage.fn_constructor_kwargs, "dtype_key": dtype_key, "report_dir": report_dir}
    processor.stages[name] = stage.model_copy(update={"fn": DtypeResolvingEngineUDF, "fn_constructor_kwargs": kwargs})


def read_reports(report_dir: str) -> tuple[list[dict], list[dict]]:
    """(engines started, engines died), as the actors recorded them."""
    d = Path(report_dir)
    started = [json.loads(p.read_text()) for p in sorted(d.glob("started-*.json"))]
    died = [json.loads(p.read_text()) for p in sorted(d.glob("died-*.json"))]
    return started, died


def summarize_dtypes(started: list[dict]) -> dict:
    """The manifest's record: the dtype(s) the engines ran in, and why, per node."""
    dtypes = sorted({r["dtype"] for r in started})
    return {
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "source": started[0]["source"] if started else None,
        "nodes": {r["node"]: {"dtype": r["dtype"], "reason": r["reason"]} for r in started},
        "key": started[0]["key"] if started else None,
    }
