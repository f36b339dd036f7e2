"""The serving guards without Ray: the API-key middleware, the request limits, the ServeSpec checks."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from raydistill.serving.guard import ApiKeyMiddleware, Limits, check_chat, check_completion, key_digest

LIMITS = Limits(max_tokens=64, max_prompt_chars=100, max_n=2)


def _call(middleware, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict | None, dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "headers": headers, "query_string": b""}
    asyncio.run(middleware(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], (json.loads(body) if body else None), dict(start["headers"])


def _app_that_answers_200():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


@pytest.mark.parametrize("header,status", [
    (None, 401),
    (b"Bearer wrong", 401),
    (b"Basic s3cret", 401),
    (b"Bearer ", 401),
    (b"Bearer s3cret", 200),
    (b"bearer s3cret", 200),
])
def test_api_key_middleware(header, status):
    mw = ApiKeyMiddleware(_app_that_answers_200(), key_sha256=key_digest("s3cret"))
    got, body, headers = _call(mw, [(b"authorization", header)] if header is not None else [])
    assert got == status
    if status == 401:
        assert body["error"]["code"] == 401 and body["error"]["type"] == "authentication_error"
        assert headers[b"www-authenticate"] == b"Bearer"
        assert "s3cret" not in json.dumps(body)


def test_digest_is_not_the_key():
    assert key_digest("s3cret") != "s3cret" and len(key_digest("s3cret")) == 64


def _completion(**kw):
    return SimpleNamespace(**{"prompt": "hi", "max_tokens": 16, "n": 1, "prompt_embeds": None, **kw})


def _chat(**kw):
    return SimpleNamespace(**{"messages": [{"role": "user", "content": "hi"}], "max_tokens": None, "max_completion_tokens": None, "n": 1, **kw})


def test_completion_limits():
    assert check_completion(_completion(), LIMITS) is None
    assert check_completion(_completion(max_tokens=None), LIMITS) is None
    param, msg = check_completion(_completion(max_tokens=65), LIMITS)
    assert param == "max_tokens" and "65" in msg and "64" in msg and "serve.max_tokens" in msg
    param, msg = check_completion(_completion(prompt="x" * 101), LIMITS)
    assert param == "prompt" and "101" in msg and "serve.max_prompt_chars" in msg
    assert check_completion(_completion(prompt=[1] * 100), LIMITS) is None  # token ids count one each
    assert check_completion(_completion(prompt=[[1] * 60, [2] * 60]), LIMITS)[0] == "prompt"
    assert check_completion(_completion(n=3), LIMITS)[0] == "n"
    assert check_completion(_completion(prompt=["a", "b", "c"]), LIMITS)[0] == "prompt"  # 3 prompts > max_n
    assert check_completion(_completion(prompt=["a", "b"]), LIMITS) is None
    assert check_completion(_completion(prompt_embeds=b"x"), LIMITS)[0] == "prompt_embeds"


def test_chat_limits():
    assert check_chat(_chat(), LIMITS) is None
    assert check_chat(_chat(max_tokens=100), LIMITS)[0] == "max_tokens"
    assert check_chat(_chat(max_completion_tokens=100), LIMITS)[0] == "max_completion_tokens"
    assert check_chat(_chat(n=5), LIMITS)[0] == "n"
    long = [{"role": "system", "content": "x" * 60}, {"role": "user", "content": [{"type": "text", "text": "y" * 60}]}]
    param, msg = check_chat(_chat(messages=long), LIMITS)
    assert param == "messages" and "120" in msg


def test_serve_spec_defaults_are_safe_and_errors_are_all_reported():
    from raydistill.cli import _serve_spec
    from raydistill.spec import SpecError

    serve = _serve_spec([])
    assert serve.host == "127.0.0.1" and serve.api_key_env is None
    with pytest.raises(SpecError) as err:
        _serve_spec(["serve.min_replicas=3", "serve.max_replicas=2", "serve.max_n=0", "serve.api_key_env=not a name"])
    text = "\n".join(err.value.errors)
    assert "serve.max_n: 0" in text and "serve.api_key_env: 'not a name'" in text
    with pytest.raises(SpecError, match="max_replicas"):
        _serve_spec(["serve.min_replicas=3", "serve.max_replicas=2"])
    with pytest.raises(SpecError, match="serve.\\* keys"):
        _serve_spec(["train.workers=1"])


def test_llm_config_carries_autoscaling_and_resources(tmp_path):
    from raydistill.serving.app import FALLBACK_CHAT_TEMPLATE, llm_config
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    serve = ServeSpec(min_replicas=1, max_replicas=3, target_ongoing_requests=4, max_ongoing_requests=16, replica_resources={"CPU": 2})
    cfg = llm_config(Served("m", str(tmp_path)), serve)
    assert cfg.deployment_config["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4}
    assert cfg.deployment_config["max_ongoing_requests"] == 16
    # A dead engine fails the next health check; the defaults check every 2 s.
    assert (cfg.deployment_config["health_check_period_s"], cfg.deployment_config["health_check_timeout_s"]) == (2.0, 30.0)
    assert "dtype" not in cfg.engine_kwargs  # each replica chooses on its node
    assert cfg.placement_group_config["bundles"] == [{"CPU": 2}]
    assert cfg.engine_kwargs["chat_template"] == FALLBACK_CHAT_TEMPLATE  # the directory has none
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    assert "chat_template" not in llm_config(Served("m", str(tmp_path)), serve).engine_kwargs


def test_api_key_from_env(monkeypatch):
    from raydistill.serving.app import api_key_from_env
    from raydistill.spec import ServeSpec, SpecError

    assert api_key_from_env(ServeSpec()) is None
    monkeypatch.delenv("RD_TEST_KEY", raising=False)
    with pytest.raises(SpecError, match="RD_TEST_KEY is not set"):
        api_key_from_env(ServeSpec(api_key_env="RD_TEST_KEY"))
    monkeypatch.setenv("RD_TEST_KEY", " k1 ")
    assert api_key_from_env(ServeSpec(api_key_env="RD_TEST_KEY")) == "k1"


def test_curl_example_names_the_variable_not_the_key():
    from raydistill.serving.app import curl_example

    text = curl_example("http://127.0.0.1:8000", "m", "MY_KEY")
    assert 'Authorization: Bearer $MY_KEY' in text and "/v1/chat/completions" in text
    assert "Authorization" not in curl_example("http://127.0.0.1:8000", "m", None)


# --------------------------------------------------------------------------- SafeErrorMiddleware

# What ray.serve.llm's 500 body held for a dead engine: a traceback, paths, an actor id, a pid, an address.
LEAKY = (b'{"error": {"message": "Traceback (most recent call last):\\n  File \\"/work/.venv/lib/python3.11/site-packages/ray/'
         b'serve/_private/replica.py\\", line 1\\nray.exceptions.ActorDiedError: actor_id=4f2a9c pid=31337, ip=10.0.3.17 '
         b'EngineDeadError", "code": 500}}')


def _app(status: int, body: bytes, headers=None, chunks: list[bytes] | None = None, raise_exc: Exception | None = None):
    async def app(scope, receive, send):
        if raise_exc is not None:
            raise raise_exc
        await send({"type": "http.response.start", "status": status, "headers": headers or [(b"content-type", b"application/json")]})
        for c in chunks or [body]:
            await send({"type": "http.response.body", "body": c, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


def _assert_clean(status: int, payload: dict, headers: dict):
    from raydistill.serving.guard import SERVER_ERROR_MESSAGE

    assert status >= 500
    assert payload == {"error": {"message": SERVER_ERROR_MESSAGE, "type": "server_error", "param": None, "code": status,
                                 "request_id": headers[b"x-request-id"].decode()}}
    assert int(headers[b"content-length"]) == len(json.dumps(payload))


def test_5xx_body_is_replaced_and_keeps_the_request_id(caplog):
    from raydistill.serving.guard import SafeErrorMiddleware

    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"req-123"), (b"content-length", str(len(LEAKY)).encode())]
    with caplog.at_level("ERROR", logger="ray.serve"):
        status, payload, sent_headers = _call(SafeErrorMiddleware(_app(500, LEAKY, headers, chunks=[LEAKY[:40], LEAKY[40:]])), [])
    _assert_clean(status, payload, sent_headers)
    assert payload["error"]["request_id"] == "req-123"
    # The whole detail stays on the server, under the same request id.
    assert "req-123" in caplog.text and "ActorDiedError" in caplog.text


@pytest.mark.parametrize("status", [502, 503])
def test_other_5xx_are_cleaned_too(status):
    from raydistill.serving.guard import SafeErrorMiddleware

    code, payload, headers = _call(SafeErrorMiddleware(_app(status, b"upstream at 10.0.0.5:8000 refused")), [])
    assert code == status
    _assert_clean(code, payload, headers)


def test_the_request_id_is_the_one_serve_gave_the_request():
    from raydistill.serving.guard import SafeErrorMiddleware

    status, payload, headers = _call(SafeErrorMiddleware(_app(500, LEAKY)), [(b"x-request-id", b"serve-req-7")])
    _assert_clean(status, payload, headers)
    assert payload["error"]["request_id"] == "serve-req-7"


def test_an_exception_becomes_a_clean_500():
    from raydistill.serving.guard import SafeErrorMiddleware

    status, payload, headers = _call(SafeErrorMiddleware(_app(200, b"", raise_exc=RuntimeError("/site-packages/x.py pid=4"))), [])
    _assert_clean(status, payload, headers)
    assert len(payload["error"]["request_id"]) == 32  # one was made up, since no response carried one


@pytest.mark.parametrize("status", [200, 400, 404])
def test_other_answers_pass_unchanged(status):
    from raydistill.serving.guard import SafeErrorMiddleware

    body = json.dumps({"error": {"message": "max_tokens is 1000", "code": status}} if status >= 400 else {"ok": 1}).encode()
    code, payload, _ = _call(SafeErrorMiddleware(_app(status, body)), [])
    assert code == status and payload == json.loads(body)


def test_error_events_in_a_stream_are_cleaned():
    from raydistill.serving.guard import SafeErrorMiddleware

    good = b'data: {"choices": [{"text": "a"}]}\n\n'
    bad = b"data: " + LEAKY + b"\n\n"
    sent = []

    async def run():
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        headers = [(b"content-type", b"text/event-stream"), (b"x-request-id", b"req-9")]
        await SafeErrorMiddleware(_app(200, b"", headers, chunks=[good, bad, b"data: [DONE]\n\n"]))({"type": "http", "path": "/v1/completions"}, receive, send)

    asyncio.run(run())
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert sent[0]["status"] == 200 and good in body and b"data: [DONE]" in body
    assert b"Traceback" not in body and b"pid" not in body and b"10.0.3.17" not in body
    events = [json.loads(line[len(b"data: "):]) for line in body.split(b"\n") if line.startswith(b"data: {")]
    assert events[1]["error"]["request_id"] == "req-9" and events[1]["error"]["type"] == "server_error"
