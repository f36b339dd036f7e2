"""Checks ``engine_args`` against vLLM's own ``EngineArgs``, so a typo or a wrong type fails ``validate``.

Without this, ``max_model_length: 512`` or ``max_model_len: "abc"`` passes validation and
crashes inside an engine actor minutes later. The names and types come from vLLM's
``EngineArgs`` dataclass (the installed vLLM's, so they follow its version), read once per installed
vLLM and cached as JSON (``_engine_fields``); a machine without vLLM (a laptop that only submits to a
cluster) skips the check and the engines report.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from functools import lru_cache
from pathlib import Path
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
def _live_fields() -> dict[str, Any] | None:
    """``EngineArgs``' field names and types, from vLLM itself (importing vLLM: ~4-7 s on a 2-core machine)."""
    import dataclasses

    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return None
    return {f.name: f.type for f in dataclasses.fields(EngineArgs)}


# The field table is cached on disk per installed vLLM, so that validating a spec (every `raydistill run`,
# before Ray starts) does not import vLLM: that import was the largest part of the teacher stage's extra
# start-up over bare vLLM (benchmarks/teacher_pass.py). Types are stored as JSON (``_type_to_json``);
# a field whose type has a vLLM class in it is stored as opaque and, when a spec sets it, checked
# against vLLM's own type after all (``_field_type``).
_FIELDS_CACHE_VERSION = 1
_OPAQUE = object()
_CLASSES = {c.__name__: c for c in (bool, int, float, str, bytes, dict, list, set, tuple, type(None))}


class _Unencodable(Exception):
    pass


def _type_to_json(tp: Any) -> Any:
    import types
    import typing

    if tp is Any:
        return {"any": True}
    if tp is Ellipsis:
        return {"ellipsis": True}
    if isinstance(tp, type) and _CLASSES.get(tp.__name__) is tp:
        return {"cls": tp.__name__}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return {"union": [_type_to_json(a) for a in args]}
    if origin is typing.Literal:
        if not all(a is None or type(a) in (str, int, bool, float) for a in args):
            raise _Unencodable(tp)
        return {"literal": list(args)}
    if origin in (list, set, tuple, dict) and args:
        return {"generic": origin.__name__, "args": [_type_to_json(a) for a in args]}
    raise _Unencodable(tp)


def _type_from_json(j: dict) -> Any:
    import typing

    if "any" in j:
        return Any
    if "ellipsis" in j:
        return Ellipsis
    if "cls" in j:
        return _CLASSES[j["cls"]]
    if "union" in j:
        return typing.Union[tuple(_type_from_json(a) for a in j["union"])]
    if "literal" in j:
        return typing.Literal[tuple(j["literal"])]
    args = tuple(_type_from_json(a) for a in j["args"])
    return _CLASSES[j["generic"]][args if len(args) > 1 else args[0]]


def _fields_cache_path() -> Path | None:
    """Where this vLLM's field table is cached: keyed by its version and its ``arg_utils.py``; None without vLLM."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("vllm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    digest = hashlib.sha256(str(_FIELDS_CACHE_VERSION).encode())
    for name in ("_version.py", "engine/arg_utils.py"):
        try:
            digest.update((root / name).read_bytes())
        except OSError:
            return None
    from raydistill.models import cache_dir  # standard library imports only

    return cache_dir() / f"vllm-engine-args-{digest.hexdigest()[:16]}.json"


@lru_cache(maxsize=1)
def _engine_fields() -> dict[str, Any] | None:
    """Field name -> type (``_OPAQUE`` where only vLLM can say), or None without vLLM."""
    import json

    path = _fields_cache_path()
    if path is None:
        return None
    try:
        return {name: _OPAQUE if j is None else _type_from_json(j) for name, j in json.loads(path.read_text()).items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: rebuilt below
    live = _live_fields()
    if live is None:
        return None
    table: dict[str, Any] = {}
    for name, tp in live.items():
        try:
            table[name] = _type_to_json(tp)
        except _Unencodable:
            table[name] = None
    try:
        from raydistill.fileio import write_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(table))
    except OSError:
        pass  # a read-only home: validation still works, it just imports vLLM each time
    return {name: _OPAQUE if table[name] is None else tp for name, tp in live.items()}


def _field_type(key: str) -> Any:
    tp = _engine_fields()[key]
    return (_live_fields() or {}).get(key) if tp is _OPAQUE else tp


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
        tp = _field_type(key)
        adapter = None if tp is None else _adapter(tp)
        if adapter is None or value is None:
            continue
        try:
            adapter.validate_python(value)
        except Exception as err:  # noqa: BLE001 - pydantic's ValidationError, reported as text
            first = err.errors()[0]["msg"] if hasattr(err, "errors") else str(err)
            problems.append(f"{key}: {value!r} is not valid for vLLM ({first})")
    return problems
