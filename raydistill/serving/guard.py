"""Request guards for the served app: the API-key check and the per-request limits.

Plain functions and an ASGI middleware, so that they are unit-tested without Ray. The ingress
(``raydistill.serving.ingress``) wires them into ray.serve.llm's OpenAI app.
"""

from __future__ import annotations

import hashlib
import hmac
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


def _messages_chars(messages: Any) -> int:
    total = 0
    for m in messages or []:
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        total += _content_chars(content)
    return total


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
    chars = _messages_chars(getattr(body, "messages", None))
    if chars > limits.max_prompt_chars:
        return "messages", f"messages hold {chars} characters; this server accepts at most {limits.max_prompt_chars} (serve.max_prompt_chars)"
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
