"""The serving commands of the CLI: ``serve`` in the foreground, ``--detach``, ``--status`` and ``--stop``.

``raydistill.cli`` parses the arguments and resolves what to serve; these functions start, find
and stop the app (``lifecycle`` keeps the record of a detached one).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from raydistill.serving.local_ray import HAPROXY_VAR, ray_env, runtime_env, uses_haproxy
from raydistill.serving.targets import Served
from raydistill.spec import ServeSpec, SpecError, is_loopback_host


def _announce(models, serve: ServeSpec, base: str) -> None:
    from raydistill.serving.app import curl_example

    print(f"\nServing {', '.join(repr(m.model_id) for m in models)} at {base}/v1  (app '{serve.app_name}')")
    for m in models:
        print(f"  {m.model_id:20s} {m.path}")
    if serve.api_key_env:
        print(f"Clients must send 'Authorization: Bearer <key>', the key in ${serve.api_key_env}.")
    elif not is_loopback_host(serve.host):  # validation let it through: serve.allow_unauthenticated
        print(f"warning: serve.host={serve.host} exposes the app beyond this machine without an API key (serve.allow_unauthenticated)", file=sys.stderr)
    print("Try it:")
    print(curl_example(base, models[0].model_id, serve.api_key_env), flush=True)


def _digest(key):
    from raydistill.serving.guard import key_digest

    return key_digest(key) if key else None


def _secret_vars(serve: ServeSpec) -> tuple[str, ...]:
    return (serve.api_key_env,) if serve.api_key_env else ()


def withhold_key(serve: ServeSpec) -> None:
    """Remove the API key's variable from this process's environment before it starts Ray processes.

    A local Ray (``ray.init`` here, or the head of ``--detach``) hands the environment to every raylet and
    worker it starts; the key has been read already and only its digest travels to the replicas.
    """
    import os

    for name in _secret_vars(serve):
        os.environ.pop(name, None)


def _say_front(serve: ServeSpec, haproxy: bool) -> None:
    if haproxy:
        print("Front: HAProxy (each replica serves HTTP itself; HAProxy's stats and metrics listen on loopback)", flush=True)
    else:
        print("Front: Serve's Python proxy" + (" (Ray finds no HAProxy binary here; serve.haproxy: auto)" if serve.haproxy == "auto" else ""), flush=True)


def _deploy(models: list[Served], serve: ServeSpec, key: str | None, haproxy: bool):
    """Deploy; if the app fails to come up on a local Ray behind HAProxy, say how to serve it without HAProxy."""
    from raydistill.serving.app import deploy

    try:
        return deploy(models, serve, _digest(key))
    except Exception:
        if haproxy:
            print("note: HAProxy fronts this app (serve.haproxy: " + str(serve.haproxy).lower() + "); if HAProxy is what failed, "
                  "--set serve.haproxy=false serves it behind Serve's Python proxy.", file=sys.stderr, flush=True)
        raise


def _note_cluster_proxy(serve: ServeSpec, address: str) -> None:
    if serve.haproxy is True:
        print(f"note: serve.haproxy applies to a Ray that raydistill starts; on {address} the cluster's own "
              f"{HAPROXY_VAR} decides which proxy fronts the app.", flush=True)


def foreground(models: list[Served], serve: ServeSpec, key: str | None, address: str | None, num_cpus: int) -> int:
    """`raydistill serve PATH...`: deploy, announce, serve until Ctrl-C or SIGTERM, then remove the app."""
    import signal
    import time

    import ray

    withhold_key(serve)
    haproxy = False
    if address:
        _note_cluster_proxy(serve, address)
        ray.init(address=address)
    else:
        import os

        haproxy = uses_haproxy(serve)
        _say_front(serve, haproxy)
        os.environ.update(ray_env(haproxy))  # the local Ray's processes inherit this process's environment
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env(haproxy))
    print(f"Starting the OpenAI-compatible app for {len(models)} model(s) ...", flush=True)
    base = _deploy(models, serve, key, haproxy)
    _announce(models, serve, base)
    print("Press Ctrl-C to stop.", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        if address:
            ray_serve.delete(serve.app_name)
        else:
            ray_serve.shutdown()
    return 0


def _connect(address: str, job_env: dict | None = None) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR", log_to_driver=False, runtime_env=job_env)


def detached(models: list[Served], serve: ServeSpec, key: str | None, address: str | None, num_cpus: int) -> int:
    """`serve --detach`: deploy on ``address``, or on a local head started for it, record where, and return."""
    import ray

    from raydistill.serving import lifecycle

    head, job_env, haproxy = None, None, False
    if not address:
        previous = lifecycle.read_state(serve.app_name)
        if previous and previous.get("head"):
            raise SpecError([f"serve --detach: app '{serve.app_name}' already runs on a local head started by raydistill; "
                             f"`raydistill serve --stop` first, or pick another --set serve.app_name"])
        print(f"Starting a local Ray head ({num_cpus} logical CPUs) that outlives this command ...", flush=True)
        haproxy = uses_haproxy(serve)
        _say_front(serve, haproxy)
        head = lifecycle.start_local_head(num_cpus, secret_vars=_secret_vars(serve), extra_env=ray_env(haproxy))
        address, job_env = head["address"], runtime_env(haproxy)
    else:
        _note_cluster_proxy(serve, address)
    withhold_key(serve)
    try:
        _connect(address, job_env)
        print(f"Deploying the OpenAI-compatible app for {len(models)} model(s) on {address} ...", flush=True)
        base = _deploy(models, serve, key, haproxy)
    except BaseException:
        if head:
            lifecycle.stop_local_head(head)
        raise
    lifecycle.write_state(serve.app_name, {
        "app_name": serve.app_name, "address": address, "base_url": base, "api_key_env": serve.api_key_env,
        "models": {m.model_id: m.path for m in models}, "head": head,
    })
    ray.shutdown()  # disconnects; Serve keeps the app running on the cluster
    _announce(models, serve, base)
    print("Detached. Check it with `raydistill serve --status`, remove it with `raydistill serve --stop`"
          + ("" if head is None else f" (which also stops the local head at {address})") + ".", flush=True)
    return 0


@dataclass(frozen=True)
class _RecordedApp:
    address: str
    state: dict | None  # what `serve --detach` recorded, when it is for this address
    head: dict | None  # the local Ray head raydistill started for the app, if any
    head_gone: bool


def _recorded_app(serve: ServeSpec, address: str | None, to_reach: str) -> _RecordedApp | None:
    """Where --status/--stop find the app; None after saying that nothing is recorded here.

    It does not connect to Ray: on a dead or unreachable head --status reports and gives up,
    while --stop still stops the head and clears the record, so each handles that itself.
    """
    from raydistill.serving import lifecycle

    state = lifecycle.read_state(serve.app_name)
    if address:
        state = state if state and state.get("address") == address else None
    elif state:
        address = state["address"]
    else:
        print(f"app '{serve.app_name}': no detached app recorded here; pass --address to {to_reach}")
        return None
    head = (state or {}).get("head")
    return _RecordedApp(address, state, head, bool(head) and not lifecycle.head_alive(head))


def status(serve: ServeSpec, address: str | None) -> int:
    """`serve --status`: the app's state, its deployments and replicas, and each engine's dtype."""
    from ray import serve as ray_serve

    found = _recorded_app(serve, address, "ask a cluster")
    if found is None:
        return 1
    address, state = found.address, found.state
    if found.head_gone:
        print(f"app '{serve.app_name}': its local Ray head (pid {found.head['pid']}) is gone; `raydistill serve --stop` clears the record")
        return 1
    try:
        _connect(address)
    except Exception as err:  # a head that died leaves only the state file behind
        print(f"app '{serve.app_name}': cannot reach Ray at {address} ({type(err).__name__}: {err})")
        return 1
    app = ray_serve.status().applications.get(serve.app_name)
    if app is None:
        print(f"app '{serve.app_name}': not deployed on {address}")
        return 1
    def plain(x) -> str:  # Serve's statuses are str enums
        return str(getattr(x, "value", x))

    print(f"app '{serve.app_name}': {plain(app.status)} on {address}" + (f"  {state['base_url']}/v1" if state else ""))
    if app.message:
        print(f"  {app.message}")
    from raydistill.serving.app import describe_dtype, engine_dtypes
    from raydistill.serving.server import NAME_PREFIX

    dtypes = engine_dtypes(serve.app_name)
    for name, dep in app.deployments.items():
        replicas = ", ".join(f"{n} {plain(s)}" for s, n in dep.replica_states.items())
        print(f"  {name:40s} {plain(dep.status):10s} replicas: {replicas or 'none'}")
        if name.removeprefix(NAME_PREFIX) in dtypes:
            print(f"  {'':40s} engine dtype: {describe_dtype(dtypes[name.removeprefix(NAME_PREFIX)])}")
    return 0


def stop(serve: ServeSpec, address: str | None) -> int:
    """`serve --stop`: delete the app; stop the local head raydistill started for it, if any."""
    from ray import serve as ray_serve

    from raydistill.serving import lifecycle

    found = _recorded_app(serve, address, "stop it on a cluster")
    if found is None:
        return 1
    address, head = found.address, found.head
    if found.head_gone:
        print(f"app '{serve.app_name}': its local Ray head (pid {head['pid']}) is gone already")
    else:
        try:
            _connect(address)
            if serve.app_name in ray_serve.status().applications:
                ray_serve.delete(serve.app_name)
                print(f"app '{serve.app_name}': deleted from {address}")
            else:
                print(f"app '{serve.app_name}': not deployed on {address}")
            import ray

            ray.shutdown()
        except Exception as err:  # still stop our own head below, which takes the app with it
            if head is None:
                raise SpecError([f"serve --stop: cannot reach Ray at {address}: {type(err).__name__}: {err}"]) from None
    if head:
        lifecycle.stop_local_head(head)
        print(f"stopped the local Ray head at {address}")
    lifecycle.clear_state(serve.app_name)
    return 0
