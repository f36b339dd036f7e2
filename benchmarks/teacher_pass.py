"""Teacher pass: raydistill's Ray Data stage versus bare vLLM, and the signal storage cost.

Run from the repository root:

    .venv/bin/python benchmarks/teacher_pass.py --json out.json [--model tiny:teacher] [--prompts 1024]
    .venv/bin/python benchmarks/teacher_pass.py --storage-only --model gemma3-270m --corpus configs/data/quickstart_prompts.jsonl
    .venv/bin/python benchmarks/teacher_pass.py --throughput-only --prompts 1024

1. Throughput: the same prompts through (a) bare ``vllm.LLM.generate`` in one process and (b)
   raydistill's teacher stage on a local Ray, with the same engine arguments and sampling
   parameters by construction (both come from the stage's own ``engine_kwargs`` and
   ``sampling_params``, and the bare engine gets the stage's engine environment). Each path runs
   in a fresh Python process timed from its spawn, so both pay their whole start-up: the
   interpreter, the imports, Ray (b) and the engine. ``ratio`` = (b)/(a) in generated tokens/s
   over those whole runs. ``steady_ratio`` leaves start-up out: (a) times ``generate`` alone, with
   the engine already up; (b) runs the stage a second time, in its own fresh process, on the first
   quarter of the prompts and takes the marginal rate (tokens of the full run - tokens of the
   quarter run) / (seconds of the full run - seconds of the quarter run), so its fixed start-up
   cancels. ``breakeven_tokens`` is the job size (generated tokens) from which ``ratio`` would
   reach 0.9 at these fixed costs and rates. (Shard arrival times cannot stand in for the steady
   rate: the engine interleaves every batch it has been sent, so most shards land together.)
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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_RATIO = 0.9


def _prompts(n: int, corpus_path: Path) -> list[str]:
    corpus = [json.loads(l)["prompt"] for l in corpus_path.read_text().splitlines() if l.strip()]
    if n <= len(corpus):
        return corpus[:n]
    return [f"{corpus[i % len(corpus)]} (variant {i})" for i in range(n)]


def _specs(model_ref: str, corpus: Path, k: int, max_tokens: int, threads_bind: str):
    """The stage's spec sections for this comparison; the bare path derives its settings from them too."""
    from raydistill.spec import DataSpec, SamplingSpec, TeacherPassSpec, TeacherSpec

    data = DataSpec(path=str(corpus), eval_fraction=0.0)
    engine_args = {"max_model_len": 512, "enforce_eager": True, "dtype": "float32", "max_logprobs": 64}
    teacher = TeacherSpec(model=model_ref, engine_args=engine_args, batch_size=64, cpu_threads_bind=threads_bind)
    tp = TeacherPassSpec(mode="generate", top_k=k, sampling=SamplingSpec(max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=0))
    return data, teacher, tp


def _child_bare(args, model: str, out: dict) -> None:
    """(a): one process, ``LLM(...)`` then one ``generate`` over every prompt text (vLLM tokenizes, as the stage does)."""
    from raydistill.teacher.stage import engine_kwargs, sampling_params

    _, teacher, tp = _specs(args.model, Path(args.child_corpus), args.k, args.max_tokens, args.cpu_threads_bind)
    os.environ.update(teacher.cpu_engine_env())
    from vllm import LLM, SamplingParams

    prompts = [json.loads(l)["prompt"] for l in Path(args.child_corpus).read_text().splitlines()]
    llm = LLM(model=model, **engine_kwargs(teacher, tp))
    t_ready = time.time()
    outs = llm.generate(prompts, SamplingParams(**sampling_params(tp)), use_tqdm=False)
    out.update(done=time.time(), generate_s=time.time() - t_ready, tokens=sum(len(o.outputs[0].token_ids) for o in outs))


def _child_stage(args, model: str, out: dict) -> None:
    """(b): one process, a local Ray, then ``run_teacher_stage`` over the corpus."""
    import ray

    from raydistill.data.signals import load_signals
    from raydistill.teacher.stage import run_teacher_stage

    data, teacher, tp = _specs(args.model, Path(args.child_corpus), args.k, args.max_tokens, args.cpu_threads_bind)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    signals = Path(args.child_corpus).parent / "signals"
    run_teacher_stage(data, teacher, tp, model, str(signals))
    out["done"] = time.time()
    ray.shutdown()
    table = load_signals(signals, columns=["input_ids", "target_start"])
    out["tokens"] = sum(len(ids) - s for ids, s in zip(table["input_ids"].to_pylist(), table["target_start"].to_pylist()))


def _run_child(kind: str, args, prompts: list[str], model: str, work: Path) -> dict:
    """Run one path in a fresh process; return its figures with ``seconds`` from spawn to done."""
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "prompts.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    result = work / "result.json"
    cmd = [sys.executable, __file__, "--child", kind, "--child-corpus", str(corpus), "--child-out", str(result), "--model", args.model,
           "--k", str(args.k), "--max-tokens", str(args.max_tokens), "--cpu-threads-bind", args.cpu_threads_bind]
    log = work / "log.txt"
    spawned = time.time()
    with open(log, "w") as sink:
        # Its own process group: the child leaves with os._exit (see the end of this file), which
        # can orphan vLLM's engine-core and worker processes; they would keep polling and take CPU
        # from the next timed run, so the whole group is killed before that run starts.
        proc = subprocess.Popen(cmd, stdout=None if args.verbose else sink, stderr=subprocess.STDOUT if not args.verbose else None, start_new_session=True)
        proc.wait()
    _kill_group(proc.pid)
    if proc.returncode != 0:
        sys.stderr.write("".join(log.read_text().splitlines(keepends=True)[-40:]))
        raise RuntimeError(f"the {kind} run failed (exit {proc.returncode}); its output is above")
    figures = json.loads(result.read_text())
    figures["seconds"] = figures.pop("done") - spawned
    print(f"[{kind}] {len(prompts)} prompts: {figures['tokens']} tokens in {figures['seconds']:.1f} s", flush=True)
    return figures


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the process group ``pgid`` and wait until they are gone."""
    def members() -> list[int]:
        pids = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(") ", 1)[1].split()[2]) == pgid:
                    pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
        return pids

    for _ in range(100):
        left = members()
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise RuntimeError(f"processes of an earlier timed run are still alive: {members()}")


def throughput(args, prompts: list[str], model: str, work: Path) -> dict:
    bare = _run_child("bare", args, prompts, model, work / "bare")
    quarter = _run_child("stage", args, prompts[: len(prompts) // 4], model, work / "quarter")
    full = _run_child("stage", args, prompts, model, work / "full")
    bare_tps, ray_tps = bare["tokens"] / bare["seconds"], full["tokens"] / full["seconds"]
    bare_steady = bare["tokens"] / bare["generate_s"]
    ray_steady = (full["tokens"] - quarter["tokens"]) / (full["seconds"] - quarter["seconds"]) if full["seconds"] > quarter["seconds"] else None
    figures = {
        "bare_tokens": bare["tokens"], "bare_seconds": round(bare["seconds"], 2), "bare_tokens_per_s": round(bare_tps, 1),
        "bare_generate_seconds": round(bare["generate_s"], 2), "bare_generate_tokens_per_s": round(bare_steady, 1),
        "bare_fixed_seconds": round(bare["seconds"] - bare["generate_s"], 2),
        "raydistill_tokens": full["tokens"], "raydistill_seconds": round(full["seconds"], 2), "raydistill_tokens_per_s": round(ray_tps, 1),
        "raydistill_quarter_tokens": quarter["tokens"], "raydistill_quarter_seconds": round(quarter["seconds"], 2),
        "raydistill_steady_tokens_per_s": None if ray_steady is None else round(ray_steady, 1),
        "raydistill_fixed_seconds": None if ray_steady is None else round(full["seconds"] - full["tokens"] / ray_steady, 2),
        "ratio": round(ray_tps / bare_tps, 3),
        "steady_ratio": None if ray_steady is None else round(ray_steady / bare_steady, 3),
        "breakeven_tokens": None,
    }
    if ray_steady is not None and 1 / bare_steady - TARGET_RATIO / ray_steady > 0:
        # ratio(T) = (Fb + T/Rb) / (Fs + T/Rs) for T generated tokens; solve ratio(T) = 0.9.
        fb, fs = figures["bare_fixed_seconds"], figures["raydistill_fixed_seconds"]
        figures["breakeven_tokens"] = max(0, round((TARGET_RATIO * fs - fb) / (1 / bare_steady - TARGET_RATIO / ray_steady)))
    return figures


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
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=8, help="top-k kept in the throughput comparison")
    ap.add_argument("--cpu-threads-bind", default="auto", help="teacher.cpu_threads_bind of both paths (vLLM-CPU thread binding)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--corpus", default=str(ROOT / "configs/data/tiny_prompts.jsonl"), help="JSONL with a prompt field")
    ap.add_argument("--shard-rows", type=int, default=256,
                    help="rows per Parquet file in the storage figures (the stage's teacher_pass.shard_rows; default = its default)")
    ap.add_argument("--storage-only", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--throughput-only", action="store_true", help="skip the storage figures")
    ap.add_argument("--verbose", action="store_true", help="show the timed processes' output")
    ap.add_argument("--child", choices=["bare", "stage"], help=argparse.SUPPRESS)
    ap.add_argument("--child-corpus", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    from raydistill.models import resolve_model

    model = resolve_model(args.model)
    if args.child:
        out: dict = {}
        (_child_bare if args.child == "bare" else _child_stage)(args, model, out)
        Path(args.child_out).write_text(json.dumps(out))
        return 0

    prompts = _prompts(args.prompts, Path(args.corpus))
    figures = {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens, "k": args.k,
               "cpu_threads_bind": args.cpu_threads_bind, "shard_rows": args.shard_rows}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.storage_only:
            figures.update(throughput(args, prompts, model, work))
        storage = {}
        if not args.throughput_only:
            from vllm import LLM, SamplingParams

            from raydistill.teacher.stage import engine_kwargs, sampling_params

            _, teacher, tp = _specs(args.model, Path(args.corpus), args.k, args.max_tokens, args.cpu_threads_bind)
            os.environ.update(teacher.cpu_engine_env())
            llm = LLM(model=model, **engine_kwargs(teacher, tp))
            # With the response text, which the stage stores too (decoded in its sink).
            outs = llm.generate(prompts, SamplingParams(**{**sampling_params(tp), "detokenize": True}), use_tqdm=False)
            storage = {k: storage_at_k(llm, prompts, outs, k, work, args.shard_rows) for k in (8, 32, 50)}
            llm.llm_engine.engine_core.shutdown()  # os._exit below would orphan its processes

    if not args.storage_only:
        f = figures
        print("\n| path | generated tokens | seconds (from process spawn) | tokens/s | start-up s | tokens/s without start-up |\n|---|---|---|---|---|---|")
        print(f"| bare vllm.LLM.generate | {f['bare_tokens']} | {f['bare_seconds']:.1f} | {f['bare_tokens_per_s']:.1f} | {f['bare_fixed_seconds']:.1f} | {f['bare_generate_tokens_per_s']:.1f} |")
        print(f"| raydistill teacher stage | {f['raydistill_tokens']} | {f['raydistill_seconds']:.1f} | {f['raydistill_tokens_per_s']:.1f} | {f['raydistill_fixed_seconds']} | {f['raydistill_steady_tokens_per_s']} |")
        print(f"\nratio (raydistill / bare) = {f['ratio']}; without start-up = {f['steady_ratio']}; "
              f"ratio reaches {TARGET_RATIO} from {f['breakeven_tokens']} generated tokens")
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
