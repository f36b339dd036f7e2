"""GuardedIngress without Ray: fake model handles stand in for the LLMServer deployments."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import HTTPException
from starlette.requests import Request

from raydistill.serving.guard import Limits

LIMITS = Limits(max_tokens=64, max_prompt_chars=100, max_n=2)


class FakeHandle:
    """Mimics ``DeploymentHandle.options(stream=True).completions.remote(...)`` returning one response."""

    def __init__(self, response):
        self.response, self.bodies = response, []

    def options(self, **_):
        return self

    @property
    def completions(self):
        return self

    chat = completions

    def remote(self, body, raw_request_info):
        self.bodies.append(body)

        async def gen():
            yield self.response

        return gen()


def _request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""})


def _ingress(response=None):
    from ray.serve.llm.openai_api_models import CompletionResponse

    from raydistill.serving.ingress import GuardedIngress

    response = response or CompletionResponse.model_validate({
        "id": "c1", "model": "m", "created": 0,
        "choices": [{"index": 0, "text": "hello", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    })
    handle = FakeHandle(response)
    card = {"id": "m", "object": "model", "owned_by": "raydistill", "permission": [], "metadata": {}}
    from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard

    return GuardedIngress({"m": handle}, {"m": ModelCard.model_validate(card)}, limits=LIMITS), handle


def _run(coro):
    return asyncio.run(coro)


def test_within_limits_reaches_the_model():
    from ray.serve.llm.openai_api_models import CompletionRequest

    ingress, handle = _ingress()
    resp = _run(ingress.completions(CompletionRequest(model="m", prompt="hi", max_tokens=8), _request()))
    assert resp.status_code == 200 and json.loads(resp.body)["choices"][0]["text"] == "hello"
    assert len(handle.bodies) == 1


def test_beyond_limits_is_400_before_the_model():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    ingress, handle = _ingress()
    resp = _run(ingress.completions(CompletionRequest(model="m", prompt="hi", max_tokens=65), _request()))
    body = json.loads(resp.body)
    assert resp.status_code == 400 and body["error"]["param"] == "max_tokens" and "serve.max_tokens" in body["error"]["message"]
    resp = _run(ingress.chat(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=3), _request()))
    assert resp.status_code == 400 and json.loads(resp.body)["error"]["param"] == "n"
    assert handle.bodies == []


def test_chat_without_max_tokens_gets_the_server_cap():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    ingress, handle = _ingress()
    _run(ingress.chat(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}]), _request()))
    assert handle.bodies[0].max_tokens == LIMITS.max_tokens


def test_unknown_model_is_404():
    from ray.serve.llm.openai_api_models import CompletionRequest

    ingress, _ = _ingress()
    with pytest.raises(HTTPException) as err:
        _run(ingress.completions(CompletionRequest(model="other", prompt="hi", max_tokens=4), _request()))
    assert err.value.status_code == 404


def test_the_fastapi_app_routes_to_guarded_methods_and_checks_the_key():
    """The app ``build_guarded_app`` deploys, minus Serve: key check first, then the library's JSON errors."""
    from ray.llm._internal.serve.core.ingress.ingress import init
    from ray.serve.llm.ingress import make_fastapi_ingress
    from starlette.testclient import TestClient

    from raydistill.serving.guard import ApiKeyMiddleware, key_digest
    from raydistill.serving.ingress import GuardedIngress

    app = init()
    app.add_middleware(ApiKeyMiddleware, key_sha256=key_digest("k"))
    make_fastapi_ingress(GuardedIngress, app=app)
    routes = {r.path: r.endpoint.__qualname__ for r in app.routes if hasattr(r, "endpoint")}
    assert routes["/v1/completions"] == "GuardedIngress.completions" and routes["/v1/chat/completions"] == "GuardedIngress.chat"

    client = TestClient(app, raise_server_exceptions=False)
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/nope")):
        resp = client.request(method, path, headers={"Authorization": "Bearer wrong"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == 401, path
    # Malformed JSON is refused while parsing the body, before any model is involved.
    resp = client.post("/v1/completions", content=b'{"model": ', headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
    assert resp.status_code == 400 and "JSON decode error" in resp.json()["error"]["message"]


def test_the_single_worker_engine_overrides_what_the_library_still_calls():
    """``SingleWorkerVLLMEngine`` changes the executor in ``_start_async_llm_engine``, before the library picks the
    executor class from the config there; a Ray upgrade that moves either breaks the served engine's layout."""
    import inspect

    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    from raydistill.serving.server import SingleWorkerVLLMEngine

    assert issubclass(SingleWorkerVLLMEngine, VLLMEngine)
    assert list(inspect.signature(VLLMEngine._start_async_llm_engine).parameters) == ["self", "vllm_engine_args", "vllm_engine_config", "placement_group"]
    assert "Executor.get_class(vllm_engine_config)" in inspect.getsource(VLLMEngine._start_async_llm_engine)
    # serve --status reads the started engine's config through the attribute the library keeps it in.
    assert "self._engine_client = self._start_async_llm_engine(" in inspect.getsource(VLLMEngine.start)


def _serve_like_logger(name: str, path):
    """A logger set up as Serve sets up a replica's: a MemoryHandler (capacity 1) in front of a RotatingFileHandler."""
    import logging
    import logging.handlers

    logger = logging.getLogger(name)
    logger.propagate, logger.handlers = False, []
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.handlers.MemoryHandler(capacity=1, target=logging.handlers.RotatingFileHandler(path)))
    return logger


def _close_every_handler_of(logger) -> None:
    """What ``logging.config.dictConfig`` (vLLM's logging setup at engine start) does to every handler in the process."""
    for handler in logger.handlers:
        target = handler.target
        handler.close()
        target.close()


def test_the_serve_log_file_is_reattached_after_the_engine_closes_its_handlers(tmp_path):
    from raydistill.serving.server import serve_log_file_kept

    bare = _serve_like_logger("raydistill-test.serve-bare", tmp_path / "bare.log")
    _close_every_handler_of(bare)
    bare.info("after the engine started")
    assert "after the engine started" not in (tmp_path / "bare.log").read_text()  # the record is lost: the cause

    kept = _serve_like_logger("raydistill-test.serve-kept", tmp_path / "kept.log")
    kept.info("before")
    with serve_log_file_kept("raydistill-test.serve-kept"):
        _close_every_handler_of(kept)
        kept.info("while the engine starts")
    kept.info("after the engine started")
    assert (tmp_path / "kept.log").read_text().splitlines() == ["before", "while the engine starts", "after the engine started"]


def _vllm_app():
    """vLLM's own OpenAI app, as ``LLMServer.__serve_build_asgi_app__`` gets it from the engine (no engine here)."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m"])
    return build_app(args, supported_tasks=("generate",))


def test_vllm_app_is_cut_to_our_routes_and_guarded():
    """``guard_engine_app`` on vLLM's real app (the one-model layout): only our routes, the key, the limits, the
    body cap and closed CORS, all answered before vLLM's handlers (which would need an engine)."""
    from starlette.testclient import TestClient

    from raydistill.serving.guard import key_digest
    from raydistill.serving.ingress import guard_engine_app

    raw = _vllm_app()
    assert {"/metrics", "/health", "/version", "/v1/responses", "/scale_elastic_ep", "/v1/messages", "/tokenize"} <= {
        getattr(r, "path", "") for r in raw.routes}
    app = guard_engine_app(raw, LIMITS, key_digest("k"), max_body_bytes=4096, extra_routes=("tokenize",))
    assert {r.path for r in app.routes} == {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize"}
    assert not any("Prometheus" in m.cls.__name__ or m.cls.__name__ == "CORSMiddleware" for m in app.user_middleware)

    client = TestClient(app, raise_server_exceptions=False)
    key = {"Authorization": "Bearer k"}
    for method, path in (("GET", "/metrics"), ("GET", "/health"), ("GET", "/version"), ("POST", "/v1/responses"),
                         ("POST", "/scale_elastic_ep"), ("POST", "/v1/messages"), ("POST", "/detokenize"), ("GET", "/docs")):
        assert client.request(method, path, headers=key, json={}).status_code == 404, path
    assert client.get("/v1/models").status_code == 401
    resp = client.post("/v1/completions", headers=key, json={"model": "m", "prompt": "hi", "max_tokens": 65})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"
    resp = client.post("/v1/chat/completions", headers=key, json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                                 "tools": [{"type": "function", "function": {"name": "f" * 200}}]})
    assert resp.status_code == 400 and "serve.max_prompt_chars" in resp.json()["error"]["message"]
    assert client.post("/v1/completions", headers=key, content=b"x" * 5000).status_code == 413
    # A browser's preflight from another origin gets no CORS grant.
    resp = client.options("/v1/completions", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in resp.headers
    # Within the limits, the request passes the guards to vLLM's handler, which has no engine here: a clean 500.
    resp = client.post("/v1/completions", headers=key, json={"model": "m", "prompt": "hi", "max_tokens": 4})
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"


def test_chat_without_max_tokens_gets_the_server_cap_in_the_one_model_layout():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from raydistill.serving.ingress import _check_chat_and_cap

    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert _check_chat_and_cap(body, LIMITS) is None and body.max_tokens == LIMITS.max_tokens


def test_an_engine_app_without_the_checked_routes_is_refused():
    """A vLLM release that moved /v1/completions must fail the replica, not serve the route without limits."""
    from fastapi import FastAPI

    from raydistill.serving.ingress import guard_engine_app

    with pytest.raises(RuntimeError, match="/v1/completions"):
        guard_engine_app(FastAPI(), LIMITS, None)
