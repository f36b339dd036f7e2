"""Teacher pass: raydistill's Ray Data stage versus bare vLLM, and the signal storage cost.

Run from the repository root:

    .venv/bin/python benchmarks/teacher_pass.py --json out.json [--model tiny:teacher] [--prompts 256]
    .venv/bin/python benchmarks/teacher_pass.py --storage-only --model gemma3-270m --corpus configs/data/quickstart_prompts.jsonl
    .venv/bin/python benchmarks/teacher_pass.py --throughput-only --prompts 1024

1. Throughput: the same prompts with the same engine arguments and sampling through
   (a) bare ``vllm.LLM.generate`` in this process and (b) raydistill's teacher stage on a local
   Ray. ``ratio`` = (b)/(a) in generated tokens/s with both timings including engine start-up,
   since a teacher pass pays it too. ``steady_ratio`` leaves start-up out: (a) times
   ``generate`` alone, with the engine already up; (b) runs the stage a second time on the
   first quarter of the prompts (after a discarded 16-prompt warm-up run) and takes the marginal rate, (tokens of the full run - tokens of
   the quarter run) / (seconds of the full run - seconds of the quarter run), so its fixed
   start-up cancels. (Shard arrival times cannot stand in for it: the engine interleaves every
   batch it has been sent, so most shards land together at the end.)
2. Storage: for k in {8, 32, 50}, score the prompts' responses with bare vLLM, encode the signals
   exactly as the stage stores them (``encode_signals`` with the id order learned from the first
   16 rows, ``PARQUET_WRITE_ARGS``, one file per ``--shard-rows`` rows), and report bytes per
   target token on disk and the mean KL (nats/token) between the engine's exact top-k + tail
   distribution and the stored one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prompts(n: int, corpus_path: Path) -> list[str]:
    corpus = [json.loads(l)["prompt"] for l in corpus_path.read_text().splitlines() if l.strip()]
    if n <= len(corpus):
        return corpus[:n]
    return [f"{corpus[i % len(corpus)]} (variant {i})" for i in range(n)]


def bare_vllm(model: str, prompts: list[str], engine_args: dict, params: dict) -> tuple:
    """(seconds incl. engine start, seconds of generate alone, generated tokens, outputs, engine)."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, **engine_args)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
    t2 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return t2 - t0, t2 - t1, tokens, outs, llm


def raydistill_stage(model_ref: str, model: str, prompts: list[str], engine_args: dict, sampling: dict, k: int, work: Path) -> tuple[float, int]:
    """(seconds of the stage, generated tokens)."""

    import ray

    from raydistill.data.signals import load_signals
    from raydistill.spec import DataSpec, SamplingSpec, TeacherPassSpec, TeacherSpec
    from raydistill.teacher.stage import run_teacher_stage

    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "prompts.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    data = DataSpec(path=str(corpus), eval_fraction=0.0)
    teacher = TeacherSpec(model=model_ref, engine_args={**engine_args, "max_logprobs": 64}, batch_size=64)
    tp = TeacherPassSpec(mode="generate", top_k=k, sampling=SamplingSpec(**sampling, seed=0))
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        run_teacher_stage(data, teacher, tp, model, str(work / "signals"))
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    table = load_signals(work / "signals", columns=["input_ids", "target_start"])
    tokens = sum(len(ids) - s for ids, s in zip(table["input_ids"].to_pylist(), table["target_start"].to_pylist()))
    return seconds, tokens


def storage_at_k(llm, prompts: list[str], outs, k: int, work: Path, shard_rows: int) -> tuple[float, float, dict]:
    """Bytes per target token on disk and stored-vs-exact KL, scoring each prompt + response at k."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vllm import SamplingParams

    from raydistill.data.signals import PARQUET_WRITE_ARGS, SIGNAL_SCHEMA, decode_signals, encode_signals, learn_id_order
    from raydistill.teacher.stage import topk_from_logprob_dict

    token_prompts = [{"prompt_token_ids": list(o.prompt_token_ids) + list(o.outputs[0].token_ids)} for o in outs]
    scored = llm.generate(token_prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k), use_tqdm=False)
    rows = []
    for i, (o, s) in enumerate(zip(outs, scored)):
        start = len(o.prompt_token_ids)
        pairs = [topk_from_logprob_dict({t: {"logprob": v.logprob, "rank": v.rank} for t, v in e.items()}, k) for e in s.prompt_logprobs[start:]]
        rows.append({"id": f"p{i}", "split": "train", "input_ids": token_prompts[i]["prompt_token_ids"], "target_start": start,
                     "topk_ids": [p[0] for p in pairs], "topk_logprobs": [p[1] for p in pairs], "prompt": prompts[i], "response": o.outputs[0].text})
    exact = pa.Table.from_pylist(rows).cast(SIGNAL_SCHEMA)
    # The stage learns the id renumbering from the first engine batch it writes: the default
    # teacher.batch_size (16) rows here.
    id_order = learn_id_order(exact.slice(0, 16)["topk_ids"])
    paths = []
    for i in range(0, exact.num_rows, shard_rows):
        paths.append(work / f"k{k}-{i // shard_rows:05d}.parquet")
        pq.write_table(encode_signals(exact.slice(i, shard_rows), id_order=id_order), paths[-1], **PARQUET_WRITE_ARGS)
    stored = decode_signals(pa.concat_tables([pq.read_table(p) for p in paths]), id_order=id_order)
    if stored["topk_ids"].to_pylist() != exact["topk_ids"].to_pylist():
        raise AssertionError("stored top-k ids do not decode to the engine's")
    n_tokens = sum(len(r["topk_ids"]) for r in rows)
    columns: dict[str, int] = {}
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                name = col.path_in_schema.split(".")[0]
                columns[name] = columns.get(name, 0) + col.total_compressed_size

    def folded(col):
        lp = np.asarray([x for row in col.to_pylist() for x in row], dtype=np.float64)
        p = np.exp(lp)
        return np.concatenate([p, np.clip(1 - p.sum(1, keepdims=True), 0, 1)], axis=1)

    p, q = folded(exact["topk_logprobs"]), folded(stored["topk_logprobs"])
    kl = np.where(p > 0, p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), 0).sum(1)
    per_column = {name: round(b / n_tokens, 1) for name, b in columns.items()}
    return sum(os.path.getsize(p) for p in paths) / n_tokens, float(kl.mean()), per_column


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:teacher", help="teacher: a HF directory or a builtin")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=8, help="top-k kept in the throughput comparison")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--corpus", default=str(ROOT / "configs/data/tiny_prompts.jsonl"), help="JSONL with a prompt field")
    ap.add_argument("--shard-rows", type=int, default=256,
                    help="rows per Parquet file in the storage figures (the stage's teacher_pass.shard_rows; default = its default)")
    ap.add_argument("--storage-only", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--throughput-only", action="store_true", help="skip the storage figures")
    args = ap.parse_args()

    from raydistill.models import resolve_model

    model = resolve_model(args.model)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # The same engine settings on both paths: the stage adds max_logprobs, raw logprobs and the
    # engine-wide seed from its spec, so the bare engine gets them explicitly.
    engine_args = {"max_model_len": 512, "enforce_eager": True, "dtype": "float32"}
    bare_engine_args = {**engine_args, "max_logprobs": 64, "logprobs_mode": "raw_logprobs", "seed": 0}
    sampling = {"max_tokens": args.max_tokens, "temperature": 1.0, "top_p": 1.0}
    prompts = _prompts(args.prompts, Path(args.corpus))

    figures = {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens, "k": args.k, "shard_rows": args.shard_rows}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.storage_only:
            # A discarded warm-up run first: the first stage run of a process also pays one-time
            # costs (cold imports of vLLM and torch in new Ray workers), which would otherwise land
            # in the quarter run and inflate the marginal rate.
            raydistill_stage(args.model, model, prompts[:16], engine_args, sampling, args.k, work / "warmup")
            quarter_s, quarter_tokens = raydistill_stage(args.model, model, prompts[: len(prompts) // 4], engine_args, sampling, args.k, work / "quarter")
            ray_s, ray_tokens = raydistill_stage(args.model, model, prompts, engine_args, sampling, args.k, work / "full")
            ray_steady = (ray_tokens - quarter_tokens) / (ray_s - quarter_s) if ray_s > quarter_s else None
        bare_s, bare_gen_s, bare_tokens, outs, llm = bare_vllm(model, prompts, bare_engine_args, {**sampling, "logprobs": args.k})
        storage = {} if args.throughput_only else {k: storage_at_k(llm, prompts, outs, k, work, args.shard_rows) for k in (8, 32, 50)}

    if not args.storage_only:
        bare_tps, ray_tps, bare_steady = bare_tokens / bare_s, ray_tokens / ray_s, bare_tokens / bare_gen_s
        figures.update({
            "bare_tokens": bare_tokens, "bare_seconds": round(bare_s, 2), "bare_tokens_per_s": round(bare_tps, 1),
            "bare_generate_tokens_per_s": round(bare_steady, 1),
            "raydistill_tokens": ray_tokens, "raydistill_seconds": round(ray_s, 2), "raydistill_tokens_per_s": round(ray_tps, 1),
            "raydistill_quarter_tokens": quarter_tokens, "raydistill_quarter_seconds": round(quarter_s, 2),
            "raydistill_steady_tokens_per_s": None if ray_steady is None else round(ray_steady, 1),
            "ratio": round(ray_tps / bare_tps, 3),
            "steady_ratio": None if ray_steady is None else round(ray_steady / bare_steady, 3),
        })
        print("\n| path | generated tokens | seconds (incl. engine start) | tokens/s | tokens/s without start-up |\n|---|---|---|---|---|")
        print(f"| bare vllm.LLM.generate | {bare_tokens} | {bare_s:.1f} | {bare_tps:.1f} | {bare_steady:.1f} |")
        print(f"| raydistill teacher stage | {ray_tokens} | {ray_s:.1f} | {ray_tps:.1f} | {figures['raydistill_steady_tokens_per_s']} |")
        print(f"\nratio (raydistill / bare) = {figures['ratio']}; without start-up = {figures['steady_ratio']}")
    figures.update({f"bytes_per_token_k{k}": round(b, 1) for k, (b, _, _) in storage.items()})
    figures.update({f"kl_k{k}": kl for k, (_, kl, _) in storage.items()})
    figures.update({f"column_bytes_per_token_k{k}": cols for k, (_, _, cols) in storage.items()})
    if not storage:
        print("\n(storage figures skipped: --throughput-only)")
    else:
        print(f"\n| k | bytes / target token ({args.shard_rows}-row shards) | KL stored vs exact (nats/token) | by column |\n|---|---|---|---|")
    for k, (b, kl, cols) in storage.items():
        print(f"| {k} | {b:.1f} | {kl:.2e} | {', '.join(f'{n} {v}' for n, v in cols.items())} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # vLLM-CPU's engine-core process can hang interpreter teardown after the figures are out;
    # nothing is left to clean up that the OS does not.
    os._exit(code)
