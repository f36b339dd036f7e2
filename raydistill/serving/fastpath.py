"""A plain ``/v1/completions`` request served by the replica without vLLM's FastAPI route.

Why: on a fast engine the route's per-request machinery (FastAPI's dependency and body handling,
its own client-disconnect watcher, the renderer's hop to its tokenizer thread pool, the merged result
iterator) keeps each request out of the engine long enough that its batches run smaller than bare
vLLM's; serving the same requests through this path raised the one-model app's tokens/s by
about 6 % in an interleaved A/B (BENCHMARKS.md, "Serving").

What it does is vLLM's own non-streaming completion path, step for step, with vLLM's own pieces:
the body is validated as vLLM's ``CompletionRequest``; our limits are checked as on the route; the
prompt is rendered and tokenised by vLLM's renderer with the request's own tokenisation parameters,
inline (short prompts only); ``max_tokens`` and the sampling parameters come from vLLM's
``get_max_tokens`` and ``CompletionRequest.to_sampling_params`` with the model's generation-config
defaults; the answer is vLLM's ``CompletionResponse``, serialised as the route's ``JSONResponse``
would. Every request it does not cover (streaming, several prompts or choices, token-id or embedded
prompts, beam search, suffix, LoRA names, multimodal kwargs, long prompts, anything vLLM's model
refuses) goes to vLLM's route unchanged, as do validation errors, which that route words.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

from pydantic import ValidationError
from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
from vllm.exceptions import VLLMClientError
from vllm.renderers.inputs.preprocess import parse_model_prompt

from raydistill.serving.guard import error_body, replaying

# What vLLM's route answers with a 4xx of its own wording.
_REFUSED = (ValueError, VLLMClientError)

# Longer prompts are tokenised in vLLM's thread pool (its route), so the replica's event loop never
# blocks on one request's tokenisation for long.
INLINE_PROMPT_CHARS = 4096
# Request headers that change what vLLM's route does in ways this path does not repeat.
_ROUTE_HEADERS = ("endpoint-load-metrics-format",)


class FastCompletions:
    """ASGI middleware in front of vLLM's OpenAI app (inside our guards): plain completions are answered here.

    ``state`` is the vLLM app's ``app.state`` (its ``openai_serving_completion``, set when the app is built);
    ``check(request) -> (param, message) | None`` is the route's limit check, answered the same way.
    """

    def __init__(self, app, *, state: Any, path: str, check: Callable[[Any], tuple[str, str] | None]):
        self.app, self.state, self.path, self.check = app, state, path, check

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or _app_path(scope) != self.path:
            return await self.app(scope, receive, send)
        raw = await _read_body(receive)
        answer = await self._answer(scope, raw)
        if answer is None:  # not ours: vLLM's route gets the request as it came
            return await self.app(scope, replaying(raw, receive), send)
        status, content = answer
        body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope, raw: bytes) -> tuple[int, dict] | None:
        serving = getattr(self.state, "openai_serving_completion", None)
        if serving is None or getattr(self.state, "enable_server_load_tracking", False):
            return None
        headers = _headers(scope)
        if any(name in headers for name in _ROUTE_HEADERS) or headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return None
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                return None
            request = CompletionRequest.model_validate(body)
        except (ValueError, ValidationError):
            return None
        if not _plain(request, serving):
            return None
        problem = self.check(request)
        if problem:
            return 400, error_body(problem[1], code=400, param=problem[0])
        try:
            engine_input = _render(serving, request)
        except _REFUSED:
            return None
        # No disconnect watcher of our own (vLLM's route has one, ``with_cancellation``): Serve already watches
        # each HTTP request's client and cancels the handler when it goes (``Replica`` in direct ingress, or
        # the proxy), and the cancelled ``generate`` aborts the request in the engine. A second watcher cost
        # about 4 % of the tokens/s here, in an interleaved A/B (BENCHMARKS.md).
        try:
            return await _complete(serving, request, engine_input, headers)
        except _REFUSED:  # raised as the engine took the request (a prompt too long for the model, say): nothing was generated
            return None


def _plain(request, serving) -> bool:
    """Whether vLLM's non-streaming path for ``request`` is the one ``_complete`` repeats."""
    return (
        not request.stream
        and not request.use_beam_search
        and (request.n or 1) == 1
        and isinstance(request.prompt, str)
        and len(request.prompt) <= INLINE_PROMPT_CHARS
        and request.prompt_embeds is None
        and request.suffix is None
        and getattr(request, "mm_processor_kwargs", None) is None
        and getattr(request, "media_io_kwargs", None) is None
        and (not request.model or serving.models.is_base_model(request.model))
    )


def _render(serving, request):
    """vLLM's ``preprocess_cmpl`` for one text prompt, tokenised in this thread (short prompts only; no multimodal kwargs)."""
    extras = {"cache_salt": request.cache_salt} if request.cache_salt is not None else {}
    (engine_input,) = serving.renderer.render_cmpl([parse_model_prompt(serving.model_config, request.prompt)],
                                                   request.build_tok_params(serving.model_config), prompt_extras=extras)
    return engine_input


async def _complete(serving, request, engine_input, headers: dict[str, str]) -> tuple[int, dict]:
    """vLLM's ``OpenAIServingCompletion._create_completion`` for one prompt and one choice, not streamed."""
    raw_request = _Headers(headers)
    request_id = f"cmpl-{serving._base_request_id(raw_request, request.request_id)}"
    created = int(time.time())
    metadata = RequestResponseMetadata(request_id=request_id)
    max_tokens = get_max_tokens(serving.model_config.max_model_len, request.max_tokens, serving._extract_prompt_len(engine_input),
                                serving.default_sampling_params, serving.override_max_tokens, truncate_prompt_tokens=request.truncate_prompt_tokens)
    params = request.to_sampling_params(max_tokens, serving.default_sampling_params)
    item_id = f"{request_id}-0"
    serving._log_inputs(item_id, engine_input, params=params, lora_request=None)
    final = None
    async for final in serving.engine_client.generate(
        engine_input, params, item_id,
        trace_headers=await serving._get_trace_headers(raw_request.headers),
        priority=serving._get_priority(request, raw_request),
        data_parallel_rank=serving._get_data_parallel_rank(raw_request),
        session_id=serving._get_session_id(request, raw_request),
    ):
        pass
    if final.prompt is None:
        final.prompt = serving._extract_prompt_text(engine_input)
    response = serving.request_output_to_completion_response([final], request, request_id, created, serving.models.model_name(None),
                                                              serving.renderer.tokenizer, metadata)
    return 200, response.model_dump()


class _Headers:
    """What vLLM's request helpers read of a Starlette ``Request``: ``.headers.get(name)``, case-insensitive."""

    def __init__(self, headers: dict[str, str]):
        self.headers = _Caseless(headers)


class _Caseless(dict):
    def get(self, name, default=None):
        return super().get(name.lower(), default)

    def __contains__(self, name):
        return super().__contains__(name.lower() if isinstance(name, str) else name)


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _app_path(scope) -> str:
    """The request path inside the app: Serve mounts an app under its route prefix (``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)
