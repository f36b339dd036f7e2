"""ray.serve.llm's ``LLMServer`` with the engine's dtype chosen in the replica, on the replica's node.

What the library lacked (ray 2.60): ``LLMConfig.engine_kwargs`` is fixed where the app is
built, but whether vLLM-CPU's bf16 path works depends on the node a replica lands on
(``raydistill.engine_dtype``). The replica resolves the dtype before its engine starts (its
placement-group bundle, and so its engine, share the replica's node), answers
``engine_dtype()`` for ``serve --status``, and logs why a dead engine died. Requests,
streaming and health checks are otherwise the library's.

``SingleWorkerVLLMEngine``: the library's engine, except that a CPU engine with one worker runs it
inside vLLM's engine-core process (``raydistill.engine_process``). The library sets the multiprocess
executor for every CPU engine (``vllm_models.py``), whose worker is a third spawned process that
re-imports vLLM and trades each step with the engine core over shared memory.

``GuardedLLMServer``: the same server as the HTTP ingress of a one-model app, serving vLLM's own
OpenAI app behind our guards (``raydistill.serving.ingress.guard_engine_app``).

``serve_log_file_kept``: the replica's Serve log file keeps receiving its records after the engine starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
from typing import Any, Iterator

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm import LLMServer

from raydistill import engine_dtype
from raydistill.engine_process import executor_name, single_worker_in_engine_core

DTYPE_KEY = "serve.engine_args.dtype"
# Deployments keep the library's names ("LLMServer:<model id>"), which `serve --status` lists.
NAME_PREFIX = "LLMServer:"

logger = logging.getLogger("ray.serve")


class SingleWorkerVLLMEngine(VLLMEngine):
    def _start_async_llm_engine(self, vllm_engine_args, vllm_engine_config, placement_group):
        from vllm.platforms import current_platform

        parallel = vllm_engine_config.parallel_config
        if not (current_platform.is_cpu() and parallel.world_size == 1 and parallel.distributed_executor_backend == "mp"):
            return super()._start_async_llm_engine(vllm_engine_args, vllm_engine_config, placement_group)
        parallel.distributed_executor_backend = "uni"
        with single_worker_in_engine_core({"distributed_executor_backend": "uni"}):
            return super()._start_async_llm_engine(vllm_engine_args, vllm_engine_config, placement_group)


@contextlib.contextmanager
def serve_log_file_kept(logger_name: str = "ray.serve") -> Iterator[None]:
    """Reattach the replica's Serve log file to Serve's logger if starting the engine detached it.

    Why: Serve logs a replica through a ``MemoryHandler`` whose target is the replica's file under
    ``logs/serve/``. Starting a vLLM engine applies vLLM's logging config with ``logging.config.dictConfig``,
    which closes every handler in the process, and a closed ``MemoryHandler`` drops its target. From then on
    the replica's records (access lines, the guards' error details by request id) reach only stderr. The
    handler keeps what arrives meanwhile in its buffer and writes it once its target is back; the file handler
    reopens its file (append mode) on the next record.
    """
    kept = [(h, h.target) for h in logging.getLogger(logger_name).handlers if isinstance(h, logging.handlers.MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in kept:
            if handler.target is None and target is not None:
                handler.setTarget(target)


class DtypeResolvingLLMServer(LLMServer):
    async def __init__(self, llm_config, **kwargs: Any):
        # The self-test (once per machine) runs in a child process; keep the replica's loop free meanwhile.
        engine_args, self._dtype = await asyncio.to_thread(engine_dtype.resolve, dict(llm_config.engine_kwargs), DTYPE_KEY)
        llm_config.update_engine_kwargs(dtype=engine_args["dtype"])
        self._hint = engine_dtype.death_hint(engine_args, DTYPE_KEY)
        logger.info("model %s: engine dtype %s (%s)", llm_config.model_id, self._dtype.dtype, self._dtype.reason)
        try:
            with serve_log_file_kept():
                await super().__init__(llm_config, **{"engine_cls": SingleWorkerVLLMEngine, **kwargs})
        except Exception as err:
            raise RuntimeError(f"the vLLM engine of model {llm_config.model_id!r} failed to start: {type(err).__name__}: {err}\n{self._hint}") from err

    async def engine_dtype(self) -> dict:
        return {**self._dtype.as_dict(), "executor": executor_name(self.engine._engine_client.vllm_config)}

    async def check_health(self) -> None:
        try:
            await super().check_health()
        except Exception:
            # Serve replaces this replica next (serve.health_check_period_s); say why it died where operators look.
            logger.error("the vLLM engine of this replica is dead; Serve will replace the replica. %s", self._hint)
            raise


class GuardedLLMServer(DtypeResolvingLLMServer):
    async def __init__(self, llm_config, *, guard: dict, **kwargs: Any):
        self._guard = guard  # guard_engine_app's arguments; without them this class never serves HTTP
        await super().__init__(llm_config, **kwargs)

    async def __serve_build_asgi_app__(self):
        from raydistill.serving.ingress import guard_engine_app

        return guard_engine_app(await super().__serve_build_asgi_app__(), **self._guard)
