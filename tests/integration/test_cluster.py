"""``raydistill submit/status/logs/stop/list`` against a real two-node Ray cluster on loopback.

Each test starts its own head (``ray start --head --block``) and a second node joined with
``ray start --address`` that carries a custom resource, in a private temp dir, on free ports, with
token authentication on and a token of its own; teardown always stops both and anything they
spawned. The CLI runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Marks every process our nodes spawn (Ray passes its environment down), so teardown can find
# stragglers by pid without touching anybody else's Ray.
MARKER_VAR = "RAYDISTILL_TEST_CLUSTER"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Cluster:
    address: str  # the Jobs API (dashboard)
    env: dict[str, str]  # what a client on this machine needs, token included
    temp_dir: str

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run ``raydistill ARGS --address ...`` like a user would."""
        cmd = [sys.executable, "-m", "raydistill.cli", *args, "--address", self.address]
        return subprocess.run(cmd, cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def get(self, path: str) -> dict:
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


def _alive_nodes(cluster: Cluster) -> list[dict]:
    nodes = cluster.get("/api/v0/nodes")["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


def _wait(what: str, check, timeout_s: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: `{' '.join(p.args[:3])}` exited with {p.returncode}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f}s")


def _stragglers(marker: str) -> list[int]:
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextmanager
def local_cluster(head_cpus: int, side_cpus: int, object_store_mb: int = 200) -> Iterator[Cluster]:
    """A head plus one node with ``{"side": 1}``, both ``ray start --block`` children of this test."""
    # Short path: Ray's unix socket paths under the temp dir must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rdc-", dir="/tmp")
    marker = uuid.uuid4().hex
    gcs, dashboard, client, head_agent, side_agent = _free_ports(5)
    env = {
        **os.environ,
        # The cluster started as the README starts it (`.venv/bin/ray start`, no activated venv): the
        # job's entrypoint must find raydistill without it on PATH.
        "PATH": os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": uuid.uuid4().hex,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # teardown needs no drain
        MARKER_VAR: marker,
    }
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", f"--object-store-memory={object_store_mb * 1024 * 1024}", "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    logs = open(Path(temp_dir) / "nodes.log", "w")
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", *common, f"--port={gcs}", f"--num-cpus={head_cpus}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={head_agent}"],
            env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        cluster = Cluster(f"http://127.0.0.1:{dashboard}", env, temp_dir)
        _wait("head dashboard", lambda: cluster.get("/api/version"), 120, procs)
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", *common, f"--address=127.0.0.1:{gcs}", f"--num-cpus={side_cpus}",
             '--resources={"side": 1}', f"--dashboard-agent-listen-port={side_agent}"],
            env=env, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        _wait("second node", lambda: len(_alive_nodes(cluster)) == 2, 120, procs)
        yield cluster
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for pid in _stragglers(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        logs.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def _wait_status(cluster: Cluster, job_id: str, wanted: set[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        out = cluster.cli("status", job_id, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        status = out.stdout.split(":")[1].split()[0]
        if status in wanted:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s:.0f}s")


def _wait_log(cluster: Cluster, job_id: str, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    logs = ""
    while time.monotonic() < deadline:
        logs = cluster.get(f"/api/jobs/{job_id}/logs")["logs"]
        if text in logs:
            return
        time.sleep(2)
    raise AssertionError(f"{text!r} not in the logs of {job_id} after {timeout_s:.0f}s:\n{logs[-3000:]}")


def test_submit_tiny_follows_to_succeeded(tmp_path):
    """The whole tiny pipeline as a Ray Job on a two-node cluster (about 6 minutes on 2 cores)."""
    run_dir = tmp_path / "run"
    # Logical CPUs, as `raydistill run` gives a local Ray: Serve, Data and Train actors each hold one.
    with local_cluster(head_cpus=6, side_cpus=2, object_store_mb=400) as cluster:
        # Both nodes share this machine's filesystem, so the run_dir is shared storage.
        result = cluster.cli("submit", "configs/tiny.yaml", "--set", f"runtime.run_dir={run_dir}",
                             "--set", "runtime.shared_storage=true", "--set", "train.max_steps=3", "--follow", timeout=1200)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        assert "SUCCEEDED" in result.stderr
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert {name: s["status"] for name, s in manifest["stages"].items()} == {
            "teacher": "succeeded", "train": "succeeded", "eval": "succeeded", "serve-check": "succeeded"}
        assert (run_dir / "student" / "config.json").exists()
        assert (run_dir / "spec.yaml").exists()
        listed = cluster.cli("list")
        assert listed.returncode == 0 and str(run_dir) in listed.stdout


def test_stop_a_running_job(tmp_path):
    """A job stopped mid-pipeline reaches STOPPED; status, logs and list see it; a bad token is explained."""
    with local_cluster(head_cpus=2, side_cpus=1) as cluster:
        # A head on this machine: the local run_dir and corpus are accepted without runtime.shared_storage.
        submitted = cluster.cli("submit", "configs/tiny.yaml", "--set", f"runtime.run_dir={tmp_path / 'run'}")
        assert "is this machine: the cluster's nodes read this machine's paths" in submitted.stderr, submitted.stderr
        job_id = _job_id(submitted)
        assert job_id.startswith("raysubmit_")
        _wait_status(cluster, job_id, {"RUNNING"}, timeout_s=120)
        # Stop it once the pipeline is under way on the cluster: the shipped spec loaded, the driver
        # joined the cluster with the token, and the first stage began.
        _wait_log(cluster, job_id, "==> [teacher] starting", timeout_s=300)

        stopped = cluster.cli("stop", job_id, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert f"{job_id}: STOPPED" in stopped.stdout
        assert _wait_status(cluster, job_id, {"STOPPED", "SUCCEEDED", "FAILED"}, timeout_s=10) == "STOPPED"

        assert job_id in cluster.cli("list").stdout
        assert cluster.cli("logs", job_id).returncode == 0
        follow = cluster.cli("logs", job_id, "--follow")
        assert follow.returncode == 1 and "STOPPED" in follow.stderr  # non-zero: it did not succeed

        wrong = cluster.cli("status", job_id, env={**cluster.env, "RAY_AUTH_TOKEN": "not-the-token"})
        assert wrong.returncode == 1
        assert "rejected the authentication token from RAY_AUTH_TOKEN" in wrong.stderr
        assert "Traceback" not in wrong.stderr
        missing = cluster.cli("status", job_id, env={**cluster.env, "RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)})
        assert missing.returncode == 1 and "requires token authentication" in missing.stderr
