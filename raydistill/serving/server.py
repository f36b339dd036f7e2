"""ray.serve.llm's ``LLMServer`` with the engine's dtype chosen in the replica, on the replica's node.

What the library lacked (ray 2.60): ``LLMConfig.engine_kwargs`` is fixed where the app is
built, but whether vLLM-CPU's bf16 path works depends on the node a replica lands on
(``raydistill.engine_dtype``). The replica resolves the dtype before its engine starts (its
placement-group bundle, and so its engine, share the replica's node), answers
``engine_dtype()`` for ``serve --status``, and logs why a dead engine died. Requests,
streaming and health checks are otherwise the library's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.serve.llm import LLMServer

from raydistill import engine_dtype

DTYPE_KEY = "serve.engine_args.dtype"
# Deployments keep the library's names ("LLMServer:<model id>"), which `serve --status` lists.
NAME_PREFIX = "LLMServer:"

logger = logging.getLogger("ray.serve")


class DtypeResolvingLLMServer(LLMServer):
    async def __init__(self, llm_config, **kwargs: Any):
        # The self-test (once per machine) runs in a child process; keep the replica's loop free meanwhile.
        engine_args, self._dtype = await asyncio.to_thread(engine_dtype.resolve, dict(llm_config.engine_kwargs), DTYPE_KEY)
        llm_config.update_engine_kwargs(dtype=engine_args["dtype"])
        self._hint = engine_dtype.death_hint(engine_args, DTYPE_KEY)
        logger.info("model %s: engine dtype %s (%s)", llm_config.model_id, self._dtype.dtype, self._dtype.reason)
        try:
            await super().__init__(llm_config, **kwargs)
        except Exception as err:
            raise RuntimeError(f"the vLLM engine of model {llm_config.model_id!r} failed to start: {type(err).__name__}: {err}\n{self._hint}") from err

    async def engine_dtype(self) -> dict:
        return self._dtype.as_dict()

    async def check_health(self) -> None:
        try:
            await super().check_health()
        except Exception:
            # Serve replaces this replica next (serve.health_check_period_s); say why it died where operators look.
            logger.error("the vLLM engine of this replica is dead; Serve will replace the replica. %s", self._hint)
            raise
