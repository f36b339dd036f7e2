import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "raydistill")


@pytest.fixture(scope="session", autouse=True)
def _isolated_model_cache(tmp_path_factory):
    """Builtin tiny models are built once per test session into a private cache."""
    os.environ["RAYDISTILL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that nothing is listening on."""
    return _free_port()


def _run_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(args, timeout)``: the ``raydistill`` command from the repository root, output captured."""
    return _run_cli


def _kill_when(cmd: list[str], ready, what: str, timeout: float) -> None:
    """Start ``cmd`` (a ``raydistill run``) in its own session, SIGKILL it once ``ready()`` is true, and take down what
    it left (its local Ray and engine processes). Fails if the run ends first or ``ready()`` stays false for ``timeout`` s."""
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not ready():
            assert proc.poll() is None, f"the run ended before {what}"
            time.sleep(0.2)
        assert ready(), f"not {what} within {timeout:.0f} s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(2)


@pytest.fixture(scope="session")
def kill_when():
    """``kill_when(cmd, ready, what, timeout)``: run ``cmd`` and SIGKILL it (and its process group) once ``ready()``."""
    return _kill_when


# The overrides of configs/tiny.yaml that the shared run uses: the report's vLLM generation on (so
# the eval checks see speed, side-by-side answers and the student's own samples), a short training,
# and MLflow tracking to the local store under the run directory (the e2e MLflow test reads it back).
TINY_RUN_OVERRIDES = ["eval.measure_speed=true", "eval.side_by_side=2", "eval.speed_prompts=4", "eval.own_samples=4",
                      "eval.own_sample_tokens=16", "train.max_steps=6", "tracking.mlflow.experiment=raydistill-e2e"]


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory):
    from raydistill.spec import load_spec

    run_dir = tmp_path_factory.mktemp("run")
    return load_spec(ROOT / "configs" / "tiny.yaml", [f"runtime.run_dir={run_dir}", f"data.path={ROOT / 'configs/data/tiny_prompts.jsonl'}",
                                                      f"serve.port={_free_port()}", *TINY_RUN_OVERRIDES])


@pytest.fixture(scope="session")
def tiny_run(tiny_spec):
    """``raydistill run configs/tiny.yaml`` once per test session, as a user runs it.

    The e2e test checks what it leaves behind and the stage tests check each stage's output in
    it: one whole tiny pipeline instead of one per tier (each costs minutes on 2 cores).
    Returns (the run's args, the finished process, the manifest).
    """
    s = tiny_spec
    args = ["run", "configs/tiny.yaml", "--set", f"runtime.run_dir={s.runtime.run_dir}", "--set", f"data.path={s.data.path}",
            "--set", f"serve.port={s.serve.port}", *(x for o in TINY_RUN_OVERRIDES for x in ("--set", o))]
    proc = _run_cli(args, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    manifest = json.loads((Path(s.runtime.run_dir) / "manifest.json").read_text())
    return args, proc, manifest


@pytest.fixture
def run_lock_holder():
    """``run_lock_holder(run_dir)``: a separate process that holds the run directory's lock until the test ends; returns it."""
    import contextlib

    procs = []

    def hold(run_dir) -> subprocess.Popen:
        code = ("import time\nfrom raydistill.jobs.pipeline import run_lock\nfrom raydistill.jobs.rundir import RunDir\n"
                f"with run_lock(RunDir.of({str(run_dir)!r})):\n    print('held', flush=True)\n    time.sleep(600)\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
