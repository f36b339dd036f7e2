"""ray.serve.llm's OpenAI ingress with an API key and request limits in front of it.

What the library lacked (ray 2.60): ``build_openai_app`` has no authentication and no per-request
limits, and its ingress class hook (``ingress_cls_config``) cannot add middleware, because the
FastAPI app is created inside the builder. So ``build_guarded_app`` composes the same graph the
builder does (``build_llm_deployment`` per model + ``make_fastapi_ingress``), passing its own
FastAPI app: the library's (its error handling, request ids and metrics, from ``init``) with
``ApiKeyMiddleware`` and, outermost, ``SafeErrorMiddleware``. Each model's deployment is
``DtypeResolvingLLMServer``, the library's ``LLMServer`` choosing its engine dtype on its node. ``GuardedIngress`` only adds the limit checks before handing
each request to ``OpenAiIngress`` unchanged, so routing, streaming (SSE), model listing and the
404 for an unknown model stay the library's.

One model is served in one hop instead (``build_guarded_app``): its ``GuardedLLMServer`` deployment is
itself the HTTP ingress (Ray's "direct streaming" layout, ``serve.ingress()`` over ``LLMServer``), and
serves vLLM's own OpenAI app, which ``guard_engine_app`` cuts to the same routes and wraps in the same
guards. Serve's proxy then hands each request straight to the replica that holds the engine, instead
of to an ingress replica that calls that replica in turn: the hop cost more CPU a request than bare
vLLM's whole request on a small model (BENCHMARKS.md, "Serving"). Several models keep the ingress,
which routes on the request's ``model`` field.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at route build time.
from typing import Any

from fastapi import Request
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.responses import JSONResponse, Response

from raydistill.serving.guard import ApiKeyMiddleware, BodyLimitMiddleware, Limits, SafeErrorMiddleware, check_chat, check_completion, error_body

# The library's routes raydistill serves (its DEFAULT_ENDPOINTS keys); the rest need serve.extra_routes.
BASE_ROUTES = ("models", "model_data", "completions", "chat")
# Default of serve.max_body_bytes, for callers that build the app without a ServeSpec.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


def endpoint_map(extra_routes=()) -> dict:
    """The library's route table cut to ``BASE_ROUTES`` plus ``extra_routes``: any other path answers 404."""
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS

    return {name: route for name, route in DEFAULT_ENDPOINTS.items() if name in BASE_ROUTES or name in extra_routes}


def route_paths(endpoints: dict) -> dict[str, str]:
    """The path of each route in a library-style ``endpoint_map`` (name -> route decorator factory), read off
    a throwaway app, so that vLLM's own app is cut to exactly the table the ingress serves."""
    from fastapi import FastAPI

    paths = {}
    for name, route in endpoints.items():
        probe = FastAPI()
        route(probe)(lambda: None)
        paths[name] = probe.router.routes[-1].path
    return paths


def _reject(param: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(message, code=400, param=param), status_code=400)


class GuardedIngress(OpenAiIngress):
    def __init__(self, llm_deployments: dict, model_cards: dict, *, limits: Limits, **kwargs: Any):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._limits = limits

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        problem = check_completion(body, self._limits)
        if problem:
            return _reject(*problem)
        return await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        problem = _check_chat_and_cap(body, self._limits)
        if problem:
            return _reject(*problem)
        return await super().chat(body, request)


def build_fastapi_app(key_sha256: str | None, cors_origins: list[str] | tuple[str, ...] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The library's FastAPI app (error handling, request ids, metrics) with our guards (``guard_app``)."""
    from ray.llm._internal.serve.core.ingress.ingress import init as init_fastapi_app

    return guard_app(init_fastapi_app(), key_sha256, cors_origins, max_body_bytes)


def guard_app(app, key_sha256: str | None, cors_origins: list[str] | tuple[str, ...] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """``app`` with our middleware: the key check, the body cap, closed CORS and clean 5xx bodies.

    The library's ``init`` and vLLM's app both allow every origin, so any web page could read
    the answers of a server on 127.0.0.1. CORS is ours instead: closed unless
    ``serve.cors_origins`` names origins.
    """
    from fastapi.middleware.cors import CORSMiddleware

    app.middleware_stack = None  # vLLM's app builds its stack eagerly; Starlette rebuilds it on first use
    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    # Inside the key check: an unauthenticated client is turned away before its body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    if key_sha256 is not None:
        # Added late, so Starlette runs it early: nothing (not even a 404) answers without the key.
        # CORS stays outside it, so a browser's preflight (which carries no key) still gets its answer.
        app.add_middleware(ApiKeyMiddleware, key_sha256=key_sha256)
        if cors_origins:
            app.user_middleware.insert(0, app.user_middleware.pop(1))
    # Added last, so it is outermost: no 5xx body or exception text reaches a client.
    app.add_middleware(SafeErrorMiddleware)
    return app


def guard_engine_app(app, limits: Limits, key_sha256: str | None, cors_origins: list[str] | tuple[str, ...] = (),
                     max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, extra_routes: list[str] | tuple[str, ...] = (),
                     fast_completions: bool = True):
    """vLLM's OpenAI app (as ``LLMServer.__serve_build_asgi_app__`` builds it) cut to ``BASE_ROUTES`` plus
    ``extra_routes``, with the limit checks on completions and chat and ``guard_app``'s middleware; with
    ``fast_completions``, plain completions are answered inside those guards by ``FastCompletions``.

    vLLM's app also mounts metrics, health, version, docs, Anthropic messages, responses, SageMaker
    and admin routes (``/scale_elastic_ep``, ``/load``); none of them answers here (404), as on the
    ingress. Its Prometheus middleware, which timed every request for the ``/metrics`` route, goes too.
    """
    from fastapi.routing import APIRoute
    from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware

    paths = route_paths(endpoint_map(extra_routes))
    app.router.routes[:] = [r for r in app.router.routes if isinstance(r, APIRoute) and r.path in paths.values()]
    app.user_middleware = [m for m in app.user_middleware if m.cls is not PrometheusInstrumentatorMiddleware]
    _check_route(app, paths["completions"], lambda body: check_completion(body, limits))
    _check_route(app, paths["chat"], lambda body: _check_chat_and_cap(body, limits))
    if fast_completions:
        from raydistill.serving.fastpath import FastCompletions

        # Added first, so it is innermost: the key check, body cap, CORS and clean 5xx all still apply.
        app.middleware_stack = None
        app.add_middleware(FastCompletions, state=app.state, path=paths["completions"], check=lambda body: check_completion(body, limits))
    return guard_app(app, key_sha256, cors_origins, max_body_bytes)


def _check_chat_and_cap(body, limits: Limits):
    problem = check_chat(body, limits)
    if problem is None and body.max_tokens is None and body.max_completion_tokens is None:
        # vLLM's default is "the rest of the context"; the server's cap is the documented default.
        body.max_tokens = limits.max_tokens
    return problem


def _check_route(app, path: str, check) -> None:
    """Put ``check(body) -> (param, message) | None`` in front of the POST route at ``path``: a 400 naming the parameter."""
    import functools

    from fastapi.routing import APIRoute

    route = next((r for r in app.router.routes if isinstance(r, APIRoute) and r.path == path), None)
    if route is None:  # a vLLM release that moved the route: serving it unchecked is not an option
        raise RuntimeError(f"vLLM's OpenAI app has no route {path}; the request limits cannot be applied to it")
    endpoint = route.endpoint

    # functools.wraps keeps vLLM's signature (its request model and the raw Request), which FastAPI parses the body by.
    @functools.wraps(endpoint)
    async def checked(request, raw_request: Request):
        problem = check(request)
        if problem:
            return _reject(*problem)
        return await endpoint(request, raw_request)

    app.router.routes.remove(route)
    app.add_api_route(path, checked, methods=["POST"])


def build_guarded_app(llm_configs: list, limits: Limits, key_sha256: str | None, cors_origins: list[str] | tuple[str, ...] = (),
                      max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, extra_routes: list[str] | tuple[str, ...] = (),
                      ingress_options: dict | None = None, fast_completions: bool = True):
    """The OpenAI app over ``llm_configs``, guarded. One model: its ``GuardedLLMServer`` deployment alone, the
    HTTP ingress itself. Several: one ``LLMServer`` deployment each behind ``GuardedIngress``, whose deployment
    options ``ingress_options`` override (``raydistill.serving.app.ingress_options``)."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    from raydistill.serving.server import NAME_PREFIX, DtypeResolvingLLMServer, GuardedLLMServer

    if len(llm_configs) == 1:
        guard = {"limits": limits, "key_sha256": key_sha256, "cors_origins": tuple(cors_origins), "max_body_bytes": max_body_bytes,
                 "extra_routes": tuple(extra_routes), "fast_completions": fast_completions}
        # serve.ingress() with no app: the class builds its ASGI app in the replica (``__serve_build_asgi_app__``).
        return build_llm_deployment(llm_configs[0], name_prefix=NAME_PREFIX, deployment_cls=serve.ingress()(GuardedLLMServer),
                                    bind_kwargs={"guard": guard})
    app = build_fastapi_app(key_sha256, cors_origins, max_body_bytes)
    options = {**GuardedIngress.get_deployment_options(llm_configs), **(ingress_options or {})}
    if "autoscaling_config" in options:  # the library's target (~10^9) must not exceed the bound set here
        scaling = options["autoscaling_config"]
        options["autoscaling_config"] = {**scaling, "target_ongoing_requests": min(scaling.get("target_ongoing_requests", 1e9), options["max_ongoing_requests"])}
    ingress = make_fastapi_ingress(GuardedIngress, app=app, endpoint_map=endpoint_map(extra_routes))
    return serve.deployment(ingress, **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c, deployment_cls=DtypeResolvingLLMServer, name_prefix=NAME_PREFIX) for c in llm_configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in llm_configs},
        limits=limits,
    )
