"""The hardened app against a real local Serve: 413 on oversize bodies, chat limits counting tools and documents,
switched-off routes answering 404; plus the CLI's refusals (exposed host without a key, remote code without the flag).

One small app for the module (the tiny student and teacher, so the guarded ingress that routes between them is
what these tests meet; test_serve.py meets the one-model layout), shut down after it, as in test_serve.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MAX_BODY = 8192
MODEL = "tiny-student"
TEACHER = "tiny-teacher"
KEY_ENV = "RAYDISTILL_TEST_SERVE_KEY"
KEY = "test-key-hardening-51e2"  # a test-only secret; the app receives only its digest


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hardened(ray_local, model_paths):
    from ray import serve as ray_serve

    from raydistill.serving.app import deploy
    from raydistill.serving.guard import key_digest
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    serve = ServeSpec(port=_free_port(), api_key_env=KEY_ENV, engine_args={"max_model_len": 512, "enforce_eager": True},
                      max_tokens=16, max_prompt_chars=400, max_n=1, max_body_bytes=MAX_BODY, app_name="rd-hardening")
    # Two models: the layout with the ingress that routes on `model` (one model is served without it, test_serve.py).
    base = deploy([Served(MODEL, model_paths[1]), Served(TEACHER, model_paths[0])], serve, key_digest(KEY))
    yield base
    ray_serve.shutdown()


def _post(base: str, path: str, **kwargs):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(base + path, headers=headers, timeout=60, **kwargs)


def test_oversize_body_is_413_with_or_without_content_length(hardened):
    big = b'{"model": "%s", "prompt": "%s", "max_tokens": 2}' % (MODEL.encode(), b"x" * (2 * MAX_BODY))
    resp = _post(hardened, "/v1/completions", content=big)
    assert resp.status_code == 413 and "serve.max_body_bytes" in resp.json()["error"]["message"]

    def streamed():
        for i in range(0, len(big), 1024):
            yield big[i:i + 1024]

    resp = _post(hardened, "/v1/completions", content=streamed())
    assert resp.status_code == 413
    # The app answers normally afterwards.
    ok = _client(hardened).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_chat_limits_count_tools_and_documents(hardened):
    import openai

    client = _client(hardened)
    tools = [{"type": "function", "function": {"name": "lookup", "description": "d" * 500, "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError, match="tools .*max_prompt_chars"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, tools=tools)
    with pytest.raises(openai.BadRequestError, match="documents .*max_prompt_chars"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"documents": [{"title": "t", "text": "x" * 500}]})


def test_switched_off_routes_are_404(hardened):
    for path in ("/tokenize", "/detokenize", "/v1/embeddings", "/v1/score"):
        assert _post(hardened, path, json={"model": MODEL, "prompt": "hi"}).status_code == 404, path
    assert _post(hardened, "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200


def _replica_rss(app_name: str) -> int:
    """Resident bytes of this app's Serve replica processes (Ray titles them ``ray::ServeReplica:<app>:...``)."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        if any(f"ServeReplica:{app_name}:" in part for part in (proc.info["cmdline"] or [])):
            total += proc.info["memory_info"].rss
    return total


def test_overload_gets_fast_503s_with_retry_after_and_the_app_recovers(hardened, model_paths):
    """More concurrent clients than a small app serves and queues, for a fixed time: every answer is a well-formed
    completion or a 503 with Retry-After, the replicas' memory stays bounded, and the app answers normally afterwards."""
    import asyncio
    import time

    import httpx

    from raydistill.serving.app import deploy
    from raydistill.serving.guard import key_digest
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    app = "rd-overload"
    serve = ServeSpec(port=_free_port(), api_key_env=KEY_ENV, engine_args={"max_model_len": 512, "enforce_eager": True}, max_tokens=32,
                      app_name=app, max_ongoing_requests=2, target_ongoing_requests=1, max_queued_requests=2, retry_after_s=1)
    base = deploy([Served(MODEL, model_paths[1])], serve, key_digest(KEY), route_prefix="/overload")
    rss_before = _replica_rss(app)
    assert rss_before > 0
    clients, seconds = 24, 10.0
    results: list[tuple[int, str | None, object]] = []

    async def client(http: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            resp = await http.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24})
            try:
                body = resp.json()
            except ValueError:
                body = resp.text
            results.append((resp.status_code, resp.headers.get("retry-after"), body))

    async def load() -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60, limits=limits) as http:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(client(http, deadline) for _ in range(clients)))

    started = time.monotonic()
    asyncio.run(load())
    # The load stops by itself: nothing is held past the window longer than one request.
    assert time.monotonic() - started < seconds + 60
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(503) > 0 and statuses.count(200) > 0, (statuses.count(200), statuses.count(503))
    for status, retry_after, body in results:
        if status == 503:
            assert retry_after == "1", (retry_after, body)
        else:
            assert isinstance(body, dict) and isinstance(body["choices"][0]["text"], str) and body["usage"]["completion_tokens"] >= 1
    # Refused requests are not held anywhere: the replicas grew by far less than the requests sent would take.
    assert _replica_rss(app) - rss_before < 300 * 2**20
    ok = _client(base).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "raydistill.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_refuses_an_exposed_host_without_a_key_and_remote_code_without_the_flag(model_paths, tmp_path):
    import yaml

    exposed = _cli("serve", model_paths[1], "--set", "serve.host=0.0.0.0")
    assert exposed.returncode == 2 and "without an API key" in exposed.stderr
    spec = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    spec["runtime"]["run_dir"] = str(tmp_path / "run")
    spec["data"]["path"] = str(ROOT / "configs" / "data" / "tiny_prompts.jsonl")
    spec.setdefault("teacher", {}).setdefault("engine_args", {})["trust_remote_code"] = True
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    refused = _cli("validate", str(path))
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr
    accepted = _cli("validate", str(path), "--trust-remote-code")
    assert accepted.returncode == 0, accepted.stderr
