"""Checks ``engine_args`` against vLLM's own ``EngineArgs``, so a typo or a wrong type fails ``validate``.

Without this, ``max_model_length: 512`` or ``max_model_len: "abc"`` passes validation and
crashes inside an engine actor minutes later. The names and types come from vLLM's
``EngineArgs`` dataclass (the installed vLLM's, so they follow its version); a machine without
vLLM (a laptop that only submits to a cluster) skips the check and the engines report.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import Any


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
    """One message per unknown key or ill-typed value, each naming the key."""
    fields = _engine_fields()
    if fields is None:
        return []
    problems = []
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
