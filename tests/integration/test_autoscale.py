"""Autoscaled teacher inference on Ray's fake multi-node autoscaler.

Ray ships a ``fake_multinode`` node provider that launches extra raylets on this machine as if
they were cloud nodes. The head has no ``teacher`` resource; each worker node type carries one,
and each teacher engine asks for one (``teacher.resources``). A teacher pass with
``teacher.replicas: {min: 1, max: 3}`` and a backlog makes Ray Data ask for more engine actors,
the autoscaler adds nodes for them, and removes the nodes once the pass ends and they idle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from raydistill.data.signals import load_signals
from test_cluster import BIN, MARKER_VAR, ROOT, _free_ports, _stop, _stragglers, _wait  # shared cluster helpers

pytestmark = pytest.mark.integration


def _autoscaling_config(gcs_port: int, head_cpus: int) -> dict:
    # Every key the cluster-config schema needs; the fake provider ignores the ssh/docker/setup ones.
    return {
        "cluster_name": "raydistill-fake",
        "max_workers": 3,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "teacher_node": {"resources": {"CPU": 2, "teacher": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _alive_nodes(dashboard: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{dashboard}/api/v0/nodes", timeout=10) as resp:
        nodes = json.loads(resp.read())["data"]["result"]["result"]
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def test_teacher_pool_adds_nodes_under_backlog_and_releases_them(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rda-", dir="/tmp")
    marker = uuid.uuid4().hex
    gcs, dashboard_port, client, agent = _free_ports(4)
    head_cpus = 6
    config = Path(temp_dir) / "autoscaler.yaml"
    config.write_text(yaml.safe_dump(_autoscaling_config(gcs, head_cpus)))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        MARKER_VAR: marker,
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
         f"--port={gcs}", f"--num-cpus={head_cpus}", f"--autoscaling-config={config}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", "--object-store-memory=300000000", "--disable-usage-stats"],
        env=env, stdout=open(Path(temp_dir) / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    counts: list[int] = []
    stop_watch = threading.Event()
    try:
        _wait("head dashboard", lambda: _alive_nodes(dashboard) >= 1, 120, [head])

        def watch():
            while not stop_watch.is_set():
                try:
                    counts.append(_alive_nodes(dashboard))
                except OSError:
                    pass
                time.sleep(1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        corpus = tmp_path / "prompts.jsonl"
        n_prompts = 192
        corpus.write_text("".join(json.dumps({"id": f"p{i:03d}", "prompt": f"Tell me a long story about the river number {i}."}) + "\n" for i in range(n_prompts)))
        spec = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
        spec["data"]["path"] = str(corpus)
        spec["teacher"].update(batch_size=4, replicas={"min": 1, "max": 3}, resources={"teacher": 1})
        spec["teacher_pass"]["sampling"]["max_tokens"] = 48
        spec["runtime"].update(run_dir=str(tmp_path / "run"), ray_address=f"127.0.0.1:{gcs}")
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        run = subprocess.run([str(BIN / "raydistill"), "run", str(spec_path), "--stages", "teacher"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        peak = max(counts)
        assert peak > 1, f"the cluster never added a node (node counts seen: {sorted(set(counts))})"

        ids = load_signals(tmp_path / "run" / "signals", columns=["id"])["id"].to_pylist()
        assert sorted(ids) == [f"p{i:03d}" for i in range(n_prompts)]

        # Released engines leave idle nodes, which the autoscaler removes after idle_timeout_minutes.
        _wait("scale-down to the head alone", lambda: counts and counts[-1] == 1, 180, [head])
    finally:
        stop_watch.set()
        _stop(head)
        for pid in _stragglers(marker):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"node counts over time (1 s apart): {counts}")
