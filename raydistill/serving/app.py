"""Serving students with ray.serve.llm's OpenAI-compatible app."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from raydistill.spec import ServeSpec

APP_NAME = "raydistill"
# vLLM on CPU sizes its KV cache from this (GiB); its GPU-memory heuristic fails on CPU hosts.
CPU_KV_CACHE_GIB = "1"


def student_dir_of(path: str) -> str:
    """A student directory, or the ``student/`` of a run directory."""
    p = Path(path)
    if (p / "config.json").exists():
        return str(p)
    if (p / "student" / "config.json").exists():
        return str(p / "student")
    raise FileNotFoundError(f"{path} is neither a model directory (config.json) nor a run directory with student/")


def build_llm_app(model_path: str, model_id: str, serve: ServeSpec):
    from ray.serve.llm import LLMConfig, build_openai_app

    config = LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_path},
        engine_kwargs=serve.engine_args,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB}},
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"num_replicas": 1},
    )
    return build_openai_app({"llm_configs": [config]})


def start_app(model_path: str, model_id: str, serve: ServeSpec) -> str:
    """Deploy the app on the connected Ray and return its base URL once it answers."""
    from ray import serve as ray_serve

    ray_serve.start(http_options={"host": serve.host, "port": serve.port})
    ray_serve.run(build_llm_app(model_path, model_id, serve), name=APP_NAME, route_prefix="/", blocking=False)
    base = f"http://{serve.host}:{serve.port}"
    _wait_ready(base)
    return base


def _wait_ready(base: str, timeout_s: float = 600.0) -> None:
    from ray import serve as ray_serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = ray_serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"serve app {APP_NAME} is {status.status}: {status.message}")
        time.sleep(2)
    raise TimeoutError(f"serve app {APP_NAME} not running after {timeout_s:.0f}s")


def complete(base: str, model_id: str, prompt: str, max_tokens: int = 16) -> dict:
    body = json.dumps({"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def serve_check(model_path: str, model_id: str, serve: ServeSpec, prompt: str) -> dict:
    """Start the app, send one completion, shut the app down; return what was asked and answered."""
    from ray import serve as ray_serve

    try:
        base = start_app(model_path, model_id, serve)
        answer = complete(base, model_id, prompt)
    finally:
        ray_serve.shutdown()
    return {"url": f"{base}/v1/completions", "model": model_id, "prompt": prompt, "answer": answer["choices"][0]["text"], "usage": answer.get("usage")}
