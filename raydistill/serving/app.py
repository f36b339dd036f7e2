"""Serving students (and optionally their teacher) with ray.serve.llm's OpenAI-compatible app."""

from __future__ import annotations

import json
import os
import secrets
import time
import urllib.request
from pathlib import Path

from raydistill.serving.guard import Limits, key_digest
from raydistill.serving.targets import Served
from raydistill.spec import ServeSpec, SpecError

APP_NAME = "raydistill"
# vLLM on CPU sizes its KV cache from this (GiB); its GPU-memory heuristic fails on CPU hosts.
CPU_KV_CACHE_GIB = "1"
# Used only for a model directory that has none: chat requests need a template to render messages.
# The same role-prefixed template the builtin tiny models ship (raydistill.models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def student_dir_of(path: str) -> str:
    """A student directory, or the ``student/`` of a run directory."""
    p = Path(path)
    if (p / "config.json").exists():
        return str(p)
    if (p / "student" / "config.json").exists():
        return str(p / "student")
    raise FileNotFoundError(f"{path} is neither a model directory (config.json) nor a run directory with student/")


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


def llm_config(model: Served, serve: ServeSpec):
    from ray.serve.llm import LLMConfig

    engine_args = dict(serve.engine_args)
    if not has_chat_template(model.path):
        engine_args.setdefault("chat_template", FALLBACK_CHAT_TEMPLATE)
    return LLMConfig(
        model_loading_config={"model_id": model.model_id, "model_source": model.path},
        engine_kwargs=engine_args,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB}},
        placement_group_config={"bundles": [dict(serve.replica_resources)]},
        deployment_config={
            "max_ongoing_requests": serve.max_ongoing_requests,
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


def build_app(models: list[Served], serve: ServeSpec, key_sha256: str | None):
    from raydistill.serving.ingress import build_guarded_app

    return build_guarded_app([llm_config(m, serve) for m in models], limits_of(serve), key_sha256)


def base_url(serve: ServeSpec, host: str | None = None) -> str:
    shown = host or ("127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host)
    return f"http://{shown}:{serve.port}"


def deploy(models: list[Served], serve: ServeSpec, key_sha256: str | None, timeout_s: float = 600.0) -> str:
    """Deploy the app on the connected Ray and return its base URL once it is RUNNING."""
    from ray import serve as ray_serve

    ray_serve.start(http_options={"host": serve.host, "port": serve.port})
    ray_serve.run(build_app(models, serve, key_sha256), name=serve.app_name, route_prefix="/", blocking=False)
    wait_running(serve.app_name, timeout_s)
    return base_url(serve)


def start_app(model_path: str, model_id: str, serve: ServeSpec, key: str | None = None) -> str:
    """One model, as the pipeline's serve-check and the tests use it."""
    return deploy([Served(model_id, model_path)], serve, key_digest(key) if key else None)


def wait_running(app_name: str, timeout_s: float = 600.0) -> None:
    from ray import serve as ray_serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = ray_serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"serve app {app_name} is {status.status}: {status.message}")
        time.sleep(2)
    raise TimeoutError(f"serve app {app_name} not running after {timeout_s:.0f}s")


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
    return f"{choice['dtype']} ({choice['source']}: {choice['reason']})" if choice.get("source") else f"{choice['dtype']} ({choice['reason']})"


def complete(base: str, model_id: str, prompt: str, max_tokens: int = 16, key: str | None = None) -> dict:
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"{base}/v1/completions", data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def serve_check(model_path: str, model_id: str, serve: ServeSpec, prompt: str) -> dict:
    """Start the app, send one completion, shut the app down; return what was asked and answered."""
    from ray import serve as ray_serve

    # A one-off key: the short-lived check app is never open, whatever serve.host says.
    key = secrets.token_urlsafe(24)
    try:
        base = start_app(model_path, model_id, serve, key)
        answer = complete(base, model_id, prompt, key=key)
        dtypes = engine_dtypes(serve.app_name)
    finally:
        ray_serve.shutdown()
    return {"url": f"{base}/v1/completions", "model": model_id, "prompt": prompt, "answer": answer["choices"][0]["text"], "usage": answer.get("usage"),
            "engine_dtype": next(iter(dtypes.values()), None)}


def curl_example(base: str, model_id: str, api_key_env: str | None) -> str:
    auth = f" \\\n       -H \"Authorization: Bearer ${api_key_env}\"" if api_key_env else ""
    return (
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"       -d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 32}}'"
    )
