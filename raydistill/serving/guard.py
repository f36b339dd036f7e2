"""Request guards for the served app: the API-key check and the per-request limits.

Plain functions and an ASGI middleware, so that they are unit-tested without Ray. The ingress
(``raydistill.serving.ingress``) wires them into ray.serve.llm's OpenAI app.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse


def key_digest(key: str) -> str:
    """What replicas compare against: the key itself never leaves the CLI that read it."""
    return hashlib.sha256(key.encode()).hexdigest()


def error_body(message: str, *, code: int, type_: str = "invalid_request_error", param: str | None = None) -> dict:
    """An OpenAI-style error object, which the ``openai`` client turns into the matching exception."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiKeyMiddleware:
    """Answers 401 to any HTTP request without ``Authorization: Bearer <key>``.

    A pure ASGI middleware (not a per-route dependency) so that it covers every route,
    including the ones ray.serve.llm adds in later versions.
    """

    def __init__(self, app, key_sha256: str):
        self.app = app
        self.key_sha256 = key_sha256

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k.lower() == b"authorization"), b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(key_digest(token.strip()), self.key_sha256)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.authorized(scope.get("headers", [])):
            return await self.app(scope, receive, send)
        response = JSONResponse(
            error_body("missing or wrong API key: send the header 'Authorization: Bearer <key>'", code=401, type_="authentication_error"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def replaying(body: bytes, receive):
    """An ASGI ``receive`` that hands the app ``body`` (already read, whole) first, then the client's later messages."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimitMiddleware:
    """Answers 413 to a request body over ``max_bytes``: at once from ``Content-Length``, else while it streams in.

    The body is read here, up to the limit, and handed on in one piece (the routes parse all of it
    anyway), so an oversized or endless chunked body never reaches the JSON parser and holds at most
    ``max_bytes`` in memory. Messages after the body (a client's disconnect) pass through unchanged.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope.get("headers", []), b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            return await self._too_large(scope, receive, send, f"Content-Length {length.strip()}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send, f"more than {self.max_bytes} bytes streamed")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replaying(b"".join(chunks), receive), send)

    async def _too_large(self, scope, receive, send, seen: str) -> None:
        message = f"the request body is too large ({seen}); this server accepts at most {self.max_bytes} bytes (serve.max_body_bytes)"
        response = JSONResponse(error_body(message, code=413), status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


logger = logging.getLogger("ray.serve")
SERVER_ERROR_MESSAGE = "the server could not complete this request; retry it, and quote the request id if it keeps failing"


def server_error_body(request_id: str, code: int = 500) -> dict:
    """The whole of what a client learns about a server-side failure: no traceback, path, pid or address."""
    body = error_body(SERVER_ERROR_MESSAGE, code=code, type_="server_error")
    body["error"]["request_id"] = request_id
    return body


class SafeErrorMiddleware:
    """Replaces every 5xx body (and any exception) with ``server_error_body``; logs the original server-side.

    ray.serve.llm puts the replica's error text in its 500 bodies, and for a dead engine that is
    a Ray traceback with site-packages paths, the actor id, the pid and the node's IP address.
    Server-sent-event streams that carry an error object with a 5xx code are cleaned the same way.
    The request id is the one Serve's proxy put in the request's ``x-request-id`` header (the id in
    Serve's own log lines for that request), so a client's report and the logs meet.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # Serve's proxy gives every request an x-request-id; its logs and the library's carry the same id.
        state: dict[str, Any] = {"status": None, "headers": None, "request_id": _header(scope.get("headers", []), b"x-request-id"),
                                 "held": [], "sse": False, "started": False}

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                state["request_id"] = state["request_id"] or _header(headers, b"x-request-id") or uuid.uuid4().hex
                state["sse"] = (_header(headers, b"content-type") or "").startswith("text/event-stream")
                if message["status"] >= 500:
                    state["status"], state["headers"] = message["status"], headers
                    return  # held until the body is complete, then replaced
                state["started"] = True
                return await send(message)
            if message["type"] == "http.response.body":
                if state["status"] is not None:
                    state["held"].append(message.get("body", b""))
                    if not message.get("more_body", False):
                        detail = b"".join(state["held"]).decode("utf-8", "replace")
                        await self._replace(send, state["status"], state["request_id"], detail, scope, state["headers"])
                    return
                if state["sse"] and message.get("body"):
                    message = {**message, "body": self._clean_events(message["body"], state["request_id"], scope)}
            return await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as err:  # noqa: BLE001 - nothing may reach the client unfiltered
            if state["started"]:
                logger.exception("request %s failed mid-response (%s %s)", state["request_id"], scope.get("method"), scope.get("path"))
                raise
            await self._replace(send, 500, state["request_id"] or uuid.uuid4().hex, f"{type(err).__name__}: {err}", scope, None, exc=err)

    @staticmethod
    async def _replace(send, status: int, request_id: str, detail: str, scope, headers, exc: BaseException | None = None) -> None:
        logger.error("request %s answered %d (%s %s); detail: %s", request_id, status, scope.get("method"), scope.get("path"), detail,
                     exc_info=exc)
        body = json.dumps(server_error_body(request_id, status)).encode()
        kept = [(k, v) for k, v in (headers or []) if k.lower() not in (b"content-length", b"content-type", b"x-request-id")]
        await send({"type": "http.response.start", "status": status,
                    "headers": kept + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                       (b"x-request-id", request_id.encode())]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _clean_events(chunk: bytes, request_id: str, scope) -> bytes:
        if b'"error"' not in chunk:
            return chunk
        lines = []
        for line in chunk.split(b"\n"):
            if line.startswith(b"data: ") and b'"error"' in line:
                try:
                    event = json.loads(line[len(b"data: "):])
                except ValueError:
                    event = None
                err = event.get("error") if isinstance(event, dict) else None
                if isinstance(err, dict) and int(err.get("code") or 500) >= 500:
                    logger.error("request %s: error event in its stream (%s); detail: %s", request_id, scope.get("path"), err)
                    line = b"data: " + json.dumps(server_error_body(request_id, int(err.get("code") or 500))).encode()
            lines.append(line)
        return b"\n".join(lines)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    return next((v.decode("latin-1") for k, v in headers if k.lower() == name), None)


@dataclass(frozen=True)
class Limits:
    """The per-request limits of ``ServeSpec`` (max_tokens, max_prompt_chars, max_n)."""

    max_tokens: int
    max_prompt_chars: int
    max_n: int


def _prompt_chars(prompt: Any) -> int:
    """Characters of a completion prompt: str, list[str], list[int] or list[list[int]] (an id counts as one)."""
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, int):
        return 1
    if isinstance(prompt, (list, tuple)):
        return sum(_prompt_chars(p) for p in prompt)
    return len(str(prompt))


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, (list, tuple)):  # content parts: [{"type": "text", "text": ...}, ...]
        return sum(_content_chars(p.get("text") if isinstance(p, dict) else getattr(p, "text", None)) for p in content)
    return len(str(content))


def _plain(value: Any) -> Any:
    return value.model_dump(mode="json", exclude_none=True) if hasattr(value, "model_dump") else value


def _json_chars(value: Any) -> int:
    """Characters of a structured part of a request (tools, documents, template kwargs) as JSON."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(json.dumps(value, default=lambda v: _plain(v) if hasattr(v, "model_dump") else str(v), ensure_ascii=False))


def _messages_chars(messages: Any) -> int:
    """The text of every message: its content, plus its other fields (tool calls and their arguments, names) as JSON."""
    total = 0
    for m in messages or []:
        m = _plain(m)
        if not isinstance(m, dict):
            total += len(str(m))
            continue
        total += _content_chars(m.get("content"))
        rest = {k: v for k, v in m.items() if k not in ("content", "role") and v is not None}
        total += _json_chars(rest) if rest else 0
    return total


# Parts of a chat request besides its messages that the chat template renders into the prompt.
CHAT_PROMPT_PARTS = ("tools", "documents", "chat_template", "chat_template_kwargs")


def chat_prompt_chars(body: Any) -> dict[str, int]:
    """Characters per part of a chat request that becomes prompt text: messages, tools, documents, template and its kwargs."""
    parts = {"messages": _messages_chars(getattr(body, "messages", None))}
    for name in CHAT_PROMPT_PARTS:
        parts[name] = _json_chars(_plain(getattr(body, name, None)))
    return parts


def _n_prompts(prompt: Any) -> int:
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (str, list, tuple)):
        return len(prompt)
    return 1


def check_completion(body: Any, limits: Limits) -> tuple[str, str] | None:
    """``(param, message)`` for the first limit a /v1/completions request breaks, else None."""
    if getattr(body, "prompt_embeds", None) is not None:
        return "prompt_embeds", "prompt_embeds is not accepted by this server; send text or token ids"
    chars = _prompt_chars(getattr(body, "prompt", None))
    if chars > limits.max_prompt_chars:
        return "prompt", f"prompt is {chars} characters; this server accepts at most {limits.max_prompt_chars} (serve.max_prompt_chars)"
    return _check_common(body, limits, getattr(body, "max_tokens", None), "max_tokens", _n_prompts(getattr(body, "prompt", None)))


def check_chat(body: Any, limits: Limits) -> tuple[str, str] | None:
    """``(param, message)`` for the first limit a /v1/chat/completions request breaks, else None."""
    parts = chat_prompt_chars(body)
    chars = sum(parts.values())
    if chars > limits.max_prompt_chars:
        counted = ", ".join(f"{name} {n}" for name, n in parts.items() if n)
        largest = max(parts, key=parts.get)
        return largest, (f"messages, tools, documents and template kwargs hold {chars} characters ({counted}); this server accepts "
                         f"at most {limits.max_prompt_chars} (serve.max_prompt_chars)")
    if getattr(body, "max_completion_tokens", None) is not None:
        return _check_common(body, limits, body.max_completion_tokens, "max_completion_tokens", 1)
    return _check_common(body, limits, getattr(body, "max_tokens", None), "max_tokens", 1)


def _check_common(body: Any, limits: Limits, max_tokens: int | None, tokens_param: str, prompts: int) -> tuple[str, str] | None:
    if max_tokens is not None and max_tokens > limits.max_tokens:
        return tokens_param, f"{tokens_param} is {max_tokens}; this server allows at most {limits.max_tokens} (serve.max_tokens)"
    n = getattr(body, "n", None) or 1
    if n > limits.max_n:
        return "n", f"n is {n}; this server allows at most {limits.max_n} (serve.max_n)"
    # A list of prompts multiplies the work like n does, so it shares n's budget.
    if n * prompts > limits.max_n:
        return "prompt", f"{prompts} prompts x n={n} asks for {n * prompts} completions; this server allows at most {limits.max_n} per request (serve.max_n)"
    return None
