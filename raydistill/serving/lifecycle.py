"""Where a detached app lives, and how ``serve --status`` / ``serve --stop`` find it again.

``serve --detach`` needs a Ray that outlives the CLI. Given ``--address`` (or ``$RAY_ADDRESS``)
it deploys there. Otherwise it starts a local head of its own: ``ray start --head --block`` as a
child in a new session, in a private temp dir and on a free port. A private temp dir matters:
Ray records the "current cluster" in its temp dir, and a head in the default ``/tmp/ray``
would make every later ``ray.init()`` on this machine join it instead of starting its own.
The state file (one per app name, under the raydistill cache) keeps the address, the
head's pid and a marker in its processes' environment, so ``--stop`` ends exactly those
processes, never another Ray on the machine. It holds no secret: the API key is never stored.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from raydistill.fileio import write_atomic

MARKER_VAR = "RAYDISTILL_SERVE_HEAD"


def state_path(app_name: str) -> Path:
    from raydistill.models import cache_dir

    return cache_dir() / "serve" / f"{app_name}.json"


def read_state(app_name: str) -> dict | None:
    try:
        return json.loads(state_path(app_name).read_text())
    except (OSError, ValueError):
        return None


def write_state(app_name: str, state: dict) -> None:
    path = state_path(app_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(state, indent=2))


def clear_state(app_name: str) -> None:
    state_path(app_name).unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env(marker: str | None = None, secret_vars: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    # The API key's variable: every process of the head (and each worker it forks) would hold it in
    # plain text, readable in /proc by this user's other processes; replicas need only its digest.
    for name in secret_vars:
        env.pop(name, None)
    # Token authentication on, unless the user explicitly chose otherwise: the head's ports are
    # reachable by every user of this machine. Ray keeps the token in ~/.ray/auth_token.
    env.setdefault("RAY_AUTH_MODE", "token")
    if marker:
        env[MARKER_VAR] = marker
    return env


def ensure_auth_token(ray_bin: str, env: dict[str, str]) -> None:
    """With token authentication on, make sure a token exists: `ray start` refuses to create one.

    On a machine that never ran a Ray head, ~/.ray/auth_token does not exist yet; Ray's own
    `ray get-auth-token --generate` writes it (readable by this user only), as Ray's docs advise.
    """
    from raydistill.jobs.submit import find_auth_token

    if env.get("RAY_AUTH_MODE", "").lower() != "token" or find_auth_token(env) is not None:
        return
    done = subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or find_auth_token(env) is None:
        raise RuntimeError(f"could not create a Ray auth token with `ray get-auth-token --generate`: {done.stderr.strip()[-500:]}")


def start_local_head(num_cpus: int, timeout_s: float = 120.0, secret_vars: tuple[str, ...] = (), extra_env: dict[str, str] | None = None) -> dict:
    """Start a private local head, without the ``secret_vars`` in its environment and with ``extra_env``; return its record for the state file."""
    bin_dir = Path(sys.executable).parent
    ray_bin = bin_dir / "ray" if (bin_dir / "ray").exists() else "ray"
    # Short path: Ray's unix socket paths under the temp dir must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rds-", dir="/tmp")
    marker = uuid.uuid4().hex
    port = free_port()
    env = head_env(marker, secret_vars, extra_env)
    ensure_auth_token(str(ray_bin), env)
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(
        # No --node-ip-address=127.0.0.1: drivers rewrite a loopback address to the node's IP
        # before connecting, so a head bound to loopback only would be unreachable for them.
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
         f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    address_file = Path(temp_dir) / "ray_current_cluster"
    deadline = time.monotonic() + timeout_s
    while not address_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}; see {log.name}")
        if time.monotonic() > deadline:
            _terminate(proc.pid, marker)
            raise TimeoutError(f"the local Ray head did not start within {timeout_s:.0f}s; see {log.name}")
        time.sleep(0.5)
    return {"address": f"127.0.0.1:{port}", "pid": proc.pid, "marker": marker, "temp_dir": temp_dir, "create_time": _create_time(proc.pid)}


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _marked_pids(marker: str) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(MARKER_VAR) == marker:
                pids.append(proc.pid)
        except (psutil.Error, OSError):  # gone, or another user's process
            pass
    return pids


def is_ours(pid: int, marker: str, create_time: float | None = None) -> bool:
    """Whether ``pid`` is still the head we started: our marker in its environment (and its start time, when recorded).

    After a reboot or pid reuse the saved pid may name an unrelated process; that one has neither,
    or is another user's and unreadable, and is never signalled.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.environ().get(MARKER_VAR) == marker
    except (psutil.Error, OSError):
        return False


def _terminate(pid: int, marker: str, timeout_s: float = 30.0, create_time: float | None = None) -> None:
    import psutil

    ours = is_ours(pid, marker, create_time)
    try:
        if ours:
            head = psutil.Process(pid)
            head.terminate()  # `ray start --block` stops its node's processes on SIGTERM
            head.wait(timeout=timeout_s)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        pass
    # Stragglers are found by the marker alone, so only processes of our head are ever killed.
    for straggler in ([pid] if ours and _alive(pid) else []) + [p for p in _marked_pids(marker) if p != pid]:
        try:
            psutil.Process(straggler).kill()
        except psutil.NoSuchProcess:
            pass


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def head_alive(head: dict) -> bool:
    # A reused pid is not our head, however alive it is.
    return _alive(head["pid"]) and is_ours(head["pid"], head["marker"], head.get("create_time"))


def stop_local_head(head: dict) -> None:
    import shutil

    _terminate(head["pid"], head["marker"], create_time=head.get("create_time"))
    shutil.rmtree(head["temp_dir"], ignore_errors=True)
