"""Serving students (and optionally their teacher) with ray.serve.llm's OpenAI-compatible app."""

from __future__ import annotations

import json
import os
import secrets
import urllib.request
from pathlib import Path

from raydistill.serving.guard import Limits, key_digest
from raydistill.serving.targets import Served
from raydistill.spec import ServeSpec, SpecError, threads_bind_env

# vLLM on CPU sizes its KV cache from this (GiB); its GPU-memory heuristic fails on CPU hosts.
CPU_KV_CACHE_GIB = "1"
# Used only for a model directory that has none: chat requests need a template to render messages.
# The same role-prefixed template the builtin tiny models ship (raydistill.models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def has_chat_template(model_dir: str) -> bool:
    d = Path(model_dir)
    if (d / "chat_template.jinja").exists() or (d / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((d / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def api_key_from_env(serve: ServeSpec) -> str | None:
    """The key named by ``serve.api_key_env``; a named but empty variable is an error, not "no auth"."""
    if serve.api_key_env is None:
        return None
    key = os.environ.get(serve.api_key_env, "")
    if not key.strip():
        raise SpecError([f"serve.api_key_env: the environment variable {serve.api_key_env} is not set (or empty); export the API key in it"])
    return key.strip()


def limits_of(serve: ServeSpec) -> Limits:
    return Limits(max_tokens=serve.max_tokens, max_prompt_chars=serve.max_prompt_chars, max_n=serve.max_n)


def llm_config(model: Served, serve: ServeSpec, ingress: bool = False):
    """The model's ray.serve.llm config; ``ingress``: its replica is the app's HTTP ingress (one served model)."""
    from ray.serve.llm import LLMConfig

    env = {"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB, "VLLM_CPU_OMP_THREADS_BIND": threads_bind_env(serve.cpu_threads_bind)}
    if ingress and not serve.separate_user_thread:
        # Serve's switch (its throughput-optimized mode sets it too): the replica's code shares Serve's event loop, so a
        # request no longer crosses between two threads (and their GIL turns) on its way in and out.
        env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"

    engine_args = dict(serve.engine_args)
    if not serve.engine_metrics:
        # vLLM's per-step statistics (the engine core's scheduler stats, the replica's output-processor stats and
        # its stat loggers) feed only the engine metrics and vLLM's periodic throughput log line: 7 % of the
        # replica's samples in a profile, plus the engine core's share (BENCHMARKS.md). engine_args may still ask.
        engine_args.setdefault("disable_log_stats", True)
    if not has_chat_template(model.path):
        engine_args.setdefault("chat_template", FALLBACK_CHAT_TEMPLATE)
    return LLMConfig(
        model_loading_config={"model_id": model.model_id, "model_source": model.path},
        engine_kwargs=engine_args,
        runtime_env={"env_vars": env},
        placement_group_config={"bundles": [dict(serve.replica_resources)]},
        # The library's default (True) records vLLM's metrics into Ray's on every engine step, in the replica.
        log_engine_metrics=serve.engine_metrics,
        deployment_config={
            "max_ongoing_requests": serve.max_ongoing_requests,
            **backpressure(serve),
            # A dead engine fails the replica's health check at once; the period bounds how long
            # requests keep failing before Serve starts a replacement.
            "health_check_period_s": serve.health_check_period_s,
            "health_check_timeout_s": serve.health_check_timeout_s,
            "autoscaling_config": {
                "min_replicas": serve.min_replicas,
                "max_replicas": serve.max_replicas,
                "target_ongoing_requests": serve.target_ongoing_requests,
            },
        },
    )


def backpressure(serve: ServeSpec) -> dict:
    """Serve's own overload handling for a deployment: a bounded queue, and 503 + Retry-After beyond it."""
    return {"max_queued_requests": serve.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": serve.retry_after_s}}


def ingress_options(serve: ServeSpec, n_models: int) -> dict:
    """The ingress deployment's bounds. ray.serve.llm's default lets an ingress replica hold ~10^9 requests
    at once; ours admits what the models' replicas can serve at once and queues ``max_queued_requests``
    more, so overload is refused in front of the app (Serve's proxy answers 503 with Retry-After)
    instead of piling up inside it."""
    return {"max_ongoing_requests": serve.max_ongoing_requests * serve.max_replicas * n_models, **backpressure(serve)}


def build_app(models: list[Served], serve: ServeSpec, key_sha256: str | None):
    from raydistill.serving.ingress import build_guarded_app

    return build_guarded_app([llm_config(m, serve, ingress=len(models) == 1) for m in models], limits_of(serve), key_sha256, serve.cors_origins,
                             serve.max_body_bytes, serve.extra_routes, ingress_options(serve, len(models)), serve.fast_completions)


def base_url(serve: ServeSpec, host: str | None = None, port: int | None = None) -> str:
    shown = host or ("127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host)
    return f"http://{shown}:{port or serve.port}"


def deploy(models: list[Served], serve: ServeSpec, key_sha256: str | None, route_prefix: str = "/") -> str:
    """Deploy the app as ``serve.app_name`` on the connected Ray; return its base URL once it is RUNNING.

    ``serve.run`` waits for RUNNING and raises with the replicas' error when the app fails to
    deploy. When Serve already runs on the cluster, its HTTP proxy (and port) are kept and the URL
    uses them.
    """
    from ray import serve as ray_serve

    ray_serve.start(http_options={"host": serve.host, "port": serve.port})
    ray_serve.run(build_app(models, serve, key_sha256), name=serve.app_name, route_prefix=route_prefix, blocking=False)
    return base_url(serve, port=_proxy_port(serve.port)) + route_prefix.rstrip("/")


def _proxy_port(default: int) -> int:
    """The port Serve's HTTP proxies listen on: an earlier ``serve.start`` on this cluster decided it."""
    try:
        # Private, but the only place the running proxies' options are kept (ray 2.60).
        from ray.serve.context import _get_global_client

        return int(_get_global_client().http_config.port)
    except Exception:  # noqa: BLE001 - an older or newer Ray: fall back to what was asked for
        return default


def engine_dtypes(app_name: str, timeout_s: float = 30.0) -> dict[str, dict]:
    """Per served model (deployment name without the prefix): the dtype its engine runs in, as a replica reports it."""
    from ray import serve as ray_serve

    from raydistill.serving.server import NAME_PREFIX

    app = ray_serve.status().applications.get(app_name)
    out = {}
    for name, dep in (app.deployments.items() if app else []):
        if name.startswith(NAME_PREFIX) and str(getattr(dep.status, "value", dep.status)) == "HEALTHY":
            handle = ray_serve.get_deployment_handle(name, app_name=app_name)
            try:
                out[name[len(NAME_PREFIX):]] = handle.engine_dtype.remote().result(timeout_s=timeout_s)
            except Exception as err:  # noqa: BLE001 - a status line, not a failure
                out[name[len(NAME_PREFIX):]] = {"dtype": "unknown", "reason": f"{type(err).__name__}", "source": "", "key": "", "node": ""}
    return out


def describe_dtype(choice: dict) -> str:
    dtype = f"{choice['dtype']} ({choice['source']}: {choice['reason']})" if choice.get("source") else f"{choice['dtype']} ({choice['reason']})"
    return f"{dtype}; vLLM executor: {choice['executor']}" if choice.get("executor") else dtype


def complete(base: str, model_id: str, prompt: str, max_tokens: int = 16, key: str | None = None) -> dict:
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{base}/v1/completions", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def serve_check(model_path: str, model_id: str, serve: ServeSpec, prompt: str) -> dict:
    """Deploy the student as an app of its own, send one completion, delete that app; return what was asked and answered.

    The check shares the cluster with whatever Serve applications already run there (a student
    someone serves with ``serve --detach``, say): it deploys under a unique app name and route
    prefix, deletes only its own app, and never calls ``serve.shutdown()``.
    """
    from ray import serve as ray_serve

    # A one-off key: the short-lived check app is never open, whatever serve.host says.
    key = secrets.token_urlsafe(24)
    name = f"{serve.app_name}-check-{secrets.token_hex(4)}"
    check = serve.model_copy(update={"app_name": name, "min_replicas": 1, "max_replicas": 1})
    try:
        base = deploy([Served(model_id, model_path)], check, key_digest(key), route_prefix=f"/{name}")
        answer = complete(base, model_id, prompt, key=key)
        dtypes = engine_dtypes(name)
    finally:
        if name in ray_serve.status().applications:
            ray_serve.delete(name)
    return {"url": f"{base}/v1/completions", "app": name, "model": model_id, "prompt": prompt, "answer": answer["choices"][0]["text"],
            "usage": answer.get("usage"), "engine_dtype": next(iter(dtypes.values()), None)}


def curl_example(base: str, model_id: str, api_key_env: str | None) -> str:
    auth = f" \\\n       -H \"Authorization: Bearer ${api_key_env}\"" if api_key_env else ""
    return (
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"       -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'"
    )
