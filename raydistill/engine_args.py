"""Checks ``engine_args`` against vLLM's own ``EngineArgs``, so a typo or a wrong type fails ``validate``.

Without this, ``max_model_length: 512`` or ``max_model_len: "abc"`` passes validation and
crashes inside an engine actor minutes later. The names and types come from vLLM's
``EngineArgs`` dataclass (the installed vLLM's, so they follow its version); a machine without
vLLM (a laptop that only submits to a cluster) skips the check and the engines report.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from functools import lru_cache
from typing import Any, Iterator

# Engine arguments that make vLLM (and transformers under it) import and run Python code shipped
# with a model directory. A spec may ask for them; only the command line may consent
# (`--trust-remote-code`), so a spec file someone else wrote, or a run's saved spec.yaml, never can.
REMOTE_CODE_KEYS = ("trust_remote_code",)
# A ContextVar, not an argument: every section's engine_args (teacher, serve, distill.on_policy)
# is checked by pydantic validators, which only the CLI wraps (remote_code_consent).
_REMOTE_CODE_CONSENT: contextvars.ContextVar[bool] = contextvars.ContextVar("raydistill_remote_code_consent", default=False)


def remote_code_allowed() -> bool:
    """Whether the command line said `--trust-remote-code` for what is being validated now."""
    return _REMOTE_CODE_CONSENT.get()


@contextlib.contextmanager
def remote_code_consent(allowed: bool) -> Iterator[None]:
    """Within this block, engine_args may set ``trust_remote_code: true`` (the CLI's `--trust-remote-code`)."""
    token = _REMOTE_CODE_CONSENT.set(bool(allowed))
    try:
        yield
    finally:
        _REMOTE_CODE_CONSENT.reset(token)


def remote_code_problems(args: dict[str, Any]) -> list[str]:
    """One message per engine argument that would run a model's own code without the command line's consent."""
    if remote_code_allowed():
        return []
    return [f"{key}: {args[key]!r} runs Python code shipped with the model; refused unless the command line says --trust-remote-code "
            "(a spec file alone cannot turn it on)" for key in REMOTE_CODE_KEYS if args.get(key) not in (None, False)]


@lru_cache(maxsize=1)
def _engine_fields() -> dict[str, Any] | None:
    import dataclasses

    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return None
    return {f.name: f.type for f in dataclasses.fields(EngineArgs)}


@lru_cache(maxsize=None)
def _adapter(tp: Any):
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(tp)
    except Exception:  # noqa: BLE001 - a type pydantic cannot check (a vLLM config class): names only
        return None


def engine_args_problems(args: dict[str, Any]) -> list[str]:
    """One message per unknown key or ill-typed value, each naming the key, and per remote code asked without consent."""
    # Checked even without vLLM installed: a laptop that only submits must refuse it too.
    problems = remote_code_problems(args)
    fields = _engine_fields()
    if fields is None:
        return problems
    for key, value in args.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            problems.append(f"{key}: not a vLLM engine argument" + (f" (did you mean {close[0]}?)" if close else ""))
            continue
        adapter = _adapter(fields[key])
        if adapter is None or value is None:
            continue
        try:
            adapter.validate_python(value)
        except Exception as err:  # noqa: BLE001 - pydantic's ValidationError, reported as text
            first = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
            problems.append(f"{key}: {value!r} is not valid for vLLM ({first})")
    return problems
