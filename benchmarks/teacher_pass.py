"""Teacher pass: raydistill's Ray Data stage versus bare vLLM, and the signal storage cost.

Run from the repository root:

    .venv/bin/python benchmarks/teacher_pass.py --json out.json [--model tiny:teacher] [--prompts 1024]
    .venv/bin/python benchmarks/teacher_pass.py --storage-only --model gemma3-270m --corpus configs/data/quickstart_prompts.jsonl
    .venv/bin/python benchmarks/teacher_pass.py --storage-only --gemma-storage --prompts 256   # + bytes_per_token_k50_gemma
    .venv/bin/python benchmarks/teacher_pass.py --throughput-only --prompts 1024

1. Throughput: the same prompts through (a) bare ``vllm.LLM.generate`` in one process and (b)
   raydistill's teacher stage on a local Ray, with the same engine arguments and sampling
   parameters by construction (both come from the stage's own ``engine_kwargs`` and
   ``sampling_params``, and the bare engine gets the stage's engine environment). Each path runs
   in a fresh Python process timed from its spawn, so both pay their whole start-up: the
   interpreter, the imports, Ray (b) and the engine. ``ratio`` = (b)/(a) in generated tokens/s
   over those whole runs. ``steady_ratio`` leaves start-up out: both paths are timed from the moment
   their engine is up to the moment every result is in: (a) ``generate`` alone; (b) from the engine
   actor's ``started`` report (written once vLLM's engine is built, before the actor takes its
   first batch) to the stage's return, so (b) still pays its streaming, the signal columns, the
   shard writes and the pipeline's drain. ``breakeven_tokens`` is the job size (generated tokens)
   from which ``ratio`` would reach 0.9 at these fixed costs and rates. (Shard arrival times
   cannot stand in for the steady rate: the engine interleaves every batch it has been sent, so
   most shards land together.) ``marginal_steady_ratio`` is the older estimate: the stage run a
   second time on the first quarter of the prompts, (tokens full - tokens quarter) / (seconds full
   - seconds quarter). Its start-ups cancel only on average: once the stage generates as fast as
   bare vLLM (~10 s for the default job on the tiny teacher), a few seconds' jitter in the two
   engine start-ups swamps it (it read 2.1 on 2026-12-02), so it is kept for the record only.
   This runs at ``--k`` (default 8, unsuffixed keys) and at each of ``--extra-k`` (default 32:
   ``ratio_k32``, ``steady_ratio_k32``, ...).

   Host CPU per generated token, of the process that runs the engine's frontend (vLLM's
   ``AsyncLLM`` / ``LLM``: request handling and the per-token output processing, where the
   per-log-prob Python work lives) and, for context, of vLLM's engine-core process (the model).
   Method: a thread in each timed process samples ``/proc/<pid>/stat`` (utime + stime, all
   threads) every 0.2 s for that process's descendants. Bare: the benchmark process itself, read
   just before and after ``generate`` (start-up excluded), / its generated tokens. Stage: the
   engine actor (the Ray worker whose title names ``SignalEngineUDF``), its last sample, as the
   marginal (full - quarter) / (tokens full - tokens quarter), so the actor's start-up cancels as
   it does for ``steady_ratio`` (up to 0.2 s of CPU after an actor's last sample is missed).
   "Engine" CPU is every vLLM process below the frontend (engine core, and its executor's worker
   where there is one), counted the same two ways.

   Fixed start-up of each path: seconds from spawn minus generated tokens / steady rate
   (``bare_fixed_seconds``, ``raydistill_fixed_seconds``; ``startup_extra_s`` is their difference),
   and where the seconds go (``*_timeline``, seconds from spawn): imports done, Ray up, the engine
   actor's process started, its engine up (the actor's ``started`` report), the first shard written,
   done.
   ``conversion_us_per_token_k*``: the engine actor's CPU per generated token for turning finished
   vLLM outputs into signal rows, dict path against array path, measured in this process without
   an engine (``conversion_us_per_token``): a steadier figure than the end-to-end ones on a shared
   machine.
2. Storage: for k in {8, 32, 50}, score the prompts' responses with bare vLLM, encode the signals
   exactly as the stage stores them (``encode_signals`` with the entropy models learned from the
   first ``--shard-rows`` rows, ``PARQUET_WRITE_ARGS``, one file per ``--shard-rows`` rows), and
   report bytes per target token on disk (all shards, and the shards after the first, whose rows
   the models did not see) and the mean KL (nats/token) between the engine's exact top-k + tail
   distribution and the stored one. ``--gemma-storage`` adds the same at k = 50 on Gemma 3 270M
   (``bytes_per_token_k50_gemma``), run in a process of its own.
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


_TICK = os.sysconf("SC_CLK_TCK")


def _boot_time() -> float:
    return next(float(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime"))


def _proc(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, CPU seconds of all its threads so far, start time as epoch seconds) of ``pid``."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(f[1]), (int(f[11]) + int(f[12])) / _TICK, int(f[19]) / _TICK


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class _ProcSampler:
    """Every ``interval`` s, the CPU seconds and start time of each descendant of this process (the
    machine is shared: other people's engines must not count), kept after the process is gone."""

    def __init__(self, interval: float = 0.2):
        import threading

        self.seen: dict[int, dict] = {}
        self._boot, self._stop = _boot_time(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(interval)

    def sample(self) -> None:
        me = os.getpid()
        table = {int(e): p for e in os.listdir("/proc") if e.isdigit() and (p := _proc(int(e)))}
        for pid, (ppid, cpu, start) in table.items():
            up, hops = ppid, 0
            while up not in (me, 0, 1) and up in table and hops < 16:
                up, hops = table[up][0], hops + 1
            if up != me or pid == me:
                continue
            rec = self.seen.setdefault(pid, {"title": "", "start": self._boot + start, "ppid": ppid})
            rec["cpu"] = cpu
            # Ray workers and vLLM's processes rename themselves after they start: keep the latest title.
            rec["title"] = _title(pid) or rec["title"]

    def stop(self) -> dict[int, dict]:
        self._stop.set()
        self._thread.join()
        return self.seen

    def below(self, roots: set[int]) -> set[int]:
        """The pids seen whose parent chain reaches one of ``roots`` (not the roots themselves)."""
        out: set[int] = set()
        for pid in self.seen:
            up, hops = self.seen[pid]["ppid"], 0
            while up not in roots and up in self.seen and hops < 16:
                up, hops = self.seen[up]["ppid"], hops + 1
            if up in roots:
                out.add(pid)
        return out


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _child_bare(args, model: str, out: dict) -> None:
    """(a): one process, ``LLM(...)`` then one ``generate`` over every prompt text (vLLM tokenizes, as the stage does)."""
    from raydistill.teacher.stage import engine_kwargs, sampling_params

    _, teacher, tp = _specs(args.model, Path(args.child_corpus), args.k, args.max_tokens, args.cpu_threads_bind)
    os.environ.update(teacher.cpu_engine_env())
    from vllm import LLM, SamplingParams

    t_import = time.time()
    prompts = [json.loads(l)["prompt"] for l in Path(args.child_corpus).read_text().splitlines()]
    llm = LLM(model=model, **engine_kwargs(teacher, tp))
    sampler = _ProcSampler()
    sampler.sample()
    core0 = {pid: r["cpu"] for pid, r in sampler.seen.items()}
    t_ready, cpu0 = time.time(), _self_cpu()
    outs = llm.generate(prompts, SamplingParams(**sampling_params(tp)), use_tqdm=False)
    cpu1 = _self_cpu()
    out.update(done=time.time(), generate_s=time.time() - t_ready, tokens=sum(len(o.outputs[0].token_ids) for o in outs))
    sampler.sample()
    seen = sampler.stop()
    out["frontend_cpu_s"] = cpu1 - cpu0
    # vLLM's own processes (engine core, and its executor's workers where it has them): every descendant of this one.
    out["engine_core_cpu_s"] = sum(r["cpu"] - core0.get(pid, 0.0) for pid, r in seen.items())
    out["timeline"] = {"imports": t_import, "engine_up": t_ready}


def _child_stage(args, model: str, out: dict) -> None:
    """(b): one process, a local Ray, then ``run_teacher_stage`` over the corpus."""
    import threading

    import ray

    from raydistill.data.signals import load_signals
    from raydistill.teacher.stage import run_teacher_stage

    t_import = time.time()
    data, teacher, tp = _specs(args.model, Path(args.child_corpus), args.k, args.max_tokens, args.cpu_threads_bind)
    sampler = _ProcSampler()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    t_ray = time.time()
    signals = Path(args.child_corpus).parent / "signals"
    marks: dict[str, float] = {}
    done = threading.Event()

    def watch():  # when the engine reports it is up, and when the first and the last shards land
        shards = 0
        while not done.is_set():
            if "engine_up" not in marks and list((signals / "_engines").glob("started-*.json")):
                marks["engine_up"] = time.time()
            now = len(list(signals.glob("*.parquet")))
            if now > shards:
                marks.setdefault("first_shard", time.time())
                marks["last_shard"], shards = time.time(), now
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = run_teacher_stage(data, teacher, tp, model, str(signals))
    out["done"] = time.time()
    # The executor the engine ran (``uni``: its worker inside the engine-core process; ``mp``: a process of its own).
    out["engine_executor"] = sorted({n.get("executor") for n in (result["engine_dtype"] or {}).get("nodes", {}).values()} - {None})
    done.set()
    sampler.sample()
    ray.shutdown()
    seen = sampler.stop()
    actor_pids = {pid for pid, r in seen.items() if "SignalEngineUDF" in r["title"]}
    actors = [seen[pid] for pid in actor_pids]
    out["frontend_cpu_s"] = sum(r["cpu"] for r in actors)
    out["engine_core_cpu_s"] = sum(seen[pid]["cpu"] for pid in sampler.below(actor_pids))  # vLLM's processes under the actor
    out["engine_actors"] = len(actors)
    # Where the rest of the CPU went (Ray's own processes, the driver, the sink and writer workers), by process title.
    by_title: dict[str, float] = {"driver": _self_cpu()}
    for r in seen.values():
        name = " ".join(r["title"].split()[:2])[:60] or "?"
        by_title[name] = round(by_title.get(name, 0.0) + r["cpu"], 2)
    out["cpu_s_by_process"] = dict(sorted(by_title.items(), key=lambda kv: -kv[1]))
    out["timeline"] = {"imports": t_import, "ray_up": t_ray, **({"engine_actor_start": min(r["start"] for r in actors)} if actors else {}), **marks}
    table = load_signals(signals, columns=["input_ids", "target_start"])
    out["tokens"] = sum(len(ids) - s for ids, s in zip(table["input_ids"].to_pylist(), table["target_start"].to_pylist()))


def _run_child(kind: str, args, prompts: list[str], model: str, work: Path, k: int) -> dict:
    """Run one path in a fresh process; return its figures with ``seconds`` from spawn to done."""
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "prompts.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    result = work / "result.json"
    cmd = [sys.executable, __file__, "--child", kind, "--child-corpus", str(corpus), "--child-out", str(result), "--model", args.model,
           "--k", str(k), "--max-tokens", str(args.max_tokens), "--cpu-threads-bind", args.cpu_threads_bind]
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
    figures["timeline"] = {name: round(t - spawned, 2) for name, t in figures["timeline"].items()}
    figures["timeline"]["done"] = round(figures["seconds"], 2)
    print(f"[{kind} k={k}] {len(prompts)} prompts: {figures['tokens']} tokens in {figures['seconds']:.1f} s; "
          f"frontend CPU {figures['frontend_cpu_s']:.1f} s; timeline {figures['timeline']}", flush=True)
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


def throughput(args, prompts: list[str], model: str, work: Path, k: int) -> dict:
    bare = _run_child("bare", args, prompts, model, work / f"bare-k{k}", k)
    quarter = _run_child("stage", args, prompts[: len(prompts) // 4], model, work / f"quarter-k{k}", k)
    full = _run_child("stage", args, prompts, model, work / f"full-k{k}", k)
    bare_tps, ray_tps = bare["tokens"] / bare["seconds"], full["tokens"] / full["seconds"]
    bare_steady = bare["tokens"] / bare["generate_s"]
    marginal = (full["tokens"] - quarter["tokens"]) / (full["seconds"] - quarter["seconds"]) if full["seconds"] > quarter["seconds"] else None
    engine_up = full["timeline"].get("engine_up")
    ray_steady = full["tokens"] / (full["seconds"] - engine_up) if engine_up is not None and full["seconds"] > engine_up else None
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
        "marginal_steady_ratio": None if marginal is None else round(marginal / bare_steady, 3),
        "breakeven_tokens": None,
        "bare_host_cpu_us_per_token": round(1e6 * bare["frontend_cpu_s"] / bare["tokens"], 1),
        "bare_engine_core_cpu_us_per_token": round(1e6 * bare["engine_core_cpu_s"] / bare["tokens"], 1),
        "bare_timeline": bare["timeline"], "raydistill_timeline": full["timeline"], "raydistill_quarter_timeline": quarter["timeline"],
        "raydistill_engine_executor": full["engine_executor"],
    }
    d_tokens = full["tokens"] - quarter["tokens"]
    if d_tokens > 0 and full["engine_actors"] == quarter["engine_actors"] == 1:
        figures["stage_host_cpu_us_per_token"] = round(1e6 * (full["frontend_cpu_s"] - quarter["frontend_cpu_s"]) / d_tokens, 1)
        figures["stage_engine_core_cpu_us_per_token"] = round(1e6 * (full["engine_core_cpu_s"] - quarter["engine_core_cpu_s"]) / d_tokens, 1)
    else:  # an engine restarted, or the pool scaled: the marginal CPU of one actor is not defined
        figures["stage_host_cpu_us_per_token"] = figures["stage_engine_core_cpu_us_per_token"] = None
    if ray_steady is not None:
        figures["startup_extra_s"] = round(figures["raydistill_fixed_seconds"] - figures["bare_fixed_seconds"], 2)
    if ray_steady is not None and 1 / bare_steady - TARGET_RATIO / ray_steady > 0:
        # ratio(T) = (Fb + T/Rb) / (Fs + T/Rs) for T generated tokens; solve ratio(T) = 0.9.
        fb, fs = figures["bare_fixed_seconds"], figures["raydistill_fixed_seconds"]
        figures["breakeven_tokens"] = max(0, round((TARGET_RATIO * fs - fb) / (1 / bare_steady - TARGET_RATIO / ray_steady)))
    return figures


def storage_at_k(llm, prompts: list[str], outs, k: int, work: Path, shard_rows: int) -> dict:
    """Scoring each prompt + response at k: bytes per target token on disk (``bytes``; by column, ``columns``; in the
    shards after the first, whose rows the entropy models were not learned from, ``later_bytes``, None with one
    shard), the stored-vs-exact KL (``kl``), and the process CPU per target token of encoding and writing
    (``encode_us``) and of reading and decoding (``decode_us``); ``parquet_layout``: the same for schema v6's layout."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vllm import SamplingParams

    from raydistill.data.signals import FULL_SIGNAL_SCHEMA, PARQUET_WRITE_ARGS, decode_signals, encode_signals, learn_id_order, learn_signal_codec
    from raydistill.teacher.stage import topk_from_logprob_dict

    token_prompts = [{"prompt_token_ids": list(o.prompt_token_ids) + list(o.outputs[0].token_ids)} for o in outs]
    scored = llm.generate(token_prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k), use_tqdm=False)
    rows = []
    for i, (o, s) in enumerate(zip(outs, scored)):
        start = len(o.prompt_token_ids)
        pairs = [topk_from_logprob_dict({t: {"logprob": v.logprob, "rank": v.rank} for t, v in e.items()}, k) for e in s.prompt_logprobs[start:]]
        ids = token_prompts[i]["prompt_token_ids"]
        # Schema v5: the given token's own log-prob at each target position, in the top k or not.
        target = [s.prompt_logprobs[t][ids[t]].logprob for t in range(start, len(ids))]
        rows.append({"id": f"p{i}", "split": "train", "input_ids": ids, "target_start": start,
                     "topk_ids": [p[0] for p in pairs], "topk_logprobs": [p[1] for p in pairs], "prompt": prompts[i], "response": o.outputs[0].text,
                     "target_logprob": target})
    exact = pa.Table.from_pylist(rows).select(FULL_SIGNAL_SCHEMA.names).cast(FULL_SIGNAL_SCHEMA)
    n_tokens = sum(len(r["topk_ids"]) for r in rows)
    later_tokens = sum(len(r["topk_ids"]) for r in rows[shard_rows:])

    def folded(col):
        lp = np.asarray([x for row in col.to_pylist() for x in row], dtype=np.float64)
        p = np.exp(lp)
        return np.concatenate([p, np.clip(1 - p.sum(1, keepdims=True), 0, 1)], axis=1)

    exact_p = folded(exact["topk_logprobs"])

    def measure(tag: str, encode, decode) -> dict:
        """Write the shards one way, read them back; bytes, KL, and the process CPU of encoding + writing and of reading + decoding."""
        paths = []
        t0 = time.process_time()
        for i in range(0, exact.num_rows, shard_rows):
            paths.append(work / f"{tag}-k{k}-{i // shard_rows:05d}.parquet")
            pq.write_table(encode(exact.slice(i, shard_rows)), paths[-1], **PARQUET_WRITE_ARGS)
        t1 = time.process_time()
        stored = decode(pa.concat_tables([pq.read_table(p) for p in paths]))
        t2 = time.process_time()
        if stored["topk_ids"].to_pylist() != exact["topk_ids"].to_pylist():
            raise AssertionError(f"{tag}: stored top-k ids do not decode to the engine's")
        columns: dict[str, int] = {}
        for path in paths:
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                for c in range(meta.num_columns):
                    col = meta.row_group(g).column(c)
                    name = col.path_in_schema.split(".")[0]
                    columns[name] = columns.get(name, 0) + col.total_compressed_size
        q = folded(stored["topk_logprobs"])
        kl = np.where(exact_p > 0, exact_p * (np.log(np.maximum(exact_p, 1e-300)) - np.log(np.maximum(q, 1e-300))), 0).sum(1)
        return {"bytes": sum(os.path.getsize(p) for p in paths) / n_tokens, "kl": float(kl.mean()),
                "columns": {name: round(b / n_tokens, 1) for name, b in columns.items()},
                "later_bytes": sum(os.path.getsize(p) for p in paths[1:]) / later_tokens if later_tokens else None,
                "encode_us": 1e6 * (t1 - t0) / n_tokens, "decode_us": 1e6 * (t2 - t1) / n_tokens}

    # The stage learns its entropy models from the first batch its sink sees: the first shard_rows rows.
    codec = learn_signal_codec(exact.slice(0, shard_rows))
    out = measure("coded", lambda t: encode_signals(t, codec=codec), lambda t: decode_signals(t, codec=codec))
    # For comparison, in the same run: the Parquet layout as schema v6 wrote it (ids renumbered by the order of the
    # first 16 rows, byte planes, steps of 1/16 nat, float16 log tail).
    order = learn_id_order(exact.slice(0, 16)["topk_ids"])
    v6 = measure("parquet", lambda t: encode_signals(t, 16, order), lambda t: decode_signals(t, 16, order))
    return {**out, "parquet_layout": {name: v6[name] for name in ("bytes", "kl", "encode_us", "decode_us")}}


def gemma_storage(args) -> dict:
    """``bytes_per_token_k50_gemma`` and its KL: the storage figures on Gemma 3 270M (262,144-token vocabulary), the
    quickstart's first 256 prompts x 40 tokens, in a process of their own (one engine per process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gemma.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--storage-only", "--model", "gemma3-270m", "--corpus",
               str(ROOT / "configs/data/quickstart_prompts.jsonl"), "--prompts", "256", "--max-tokens", "40",
               "--shard-rows", str(args.shard_rows), "--json", str(out)]
        print(f"\n[gemma storage] {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
        g = json.loads(out.read_text())
    return {f"{name}_gemma": g[name] for name in ("bytes_per_token_k50", "kl_k50", "column_bytes_per_token_k50", "later_shards_bytes_per_token_k50",
                                                  "encode_us_per_token_k50", "decode_us_per_token_k50", "parquet_layout_k50",
                                                  "bytes_per_token_k8", "bytes_per_token_k32")}


def conversion_us_per_token(k: int, n_requests: int = 64, n_gen: int = 64, vocab: int = 512) -> dict:
    """Engine-actor CPU (process time) per generated token spent turning finished vLLM outputs into signal
    rows, without an engine: vLLM's own fill of the log-probs (dicts, or flat lists), then ray.data.llm's
    conversion plus ``to_signal_row`` (the dict path), or ``signals_from_output`` plus ``signal_columns``
    (the array path). Outputs are built with ``vllm.logprobs.append_logprobs_for_next_position``, as vLLM
    builds them. Leaves out what Ray Data did to the dict path's rows on top (Arrow type inference that
    fails, the str() of the column, pickling, the separate post-process task)."""
    import numpy as np
    import pyarrow as pa
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMOutputData
    from vllm.logprobs import append_logprobs_for_next_position, create_sample_logprobs
    from vllm.outputs import CompletionOutput, RequestOutput

    from raydistill.teacher.arrays import signal_columns, signals_from_output
    from raydistill.teacher.stage import to_signal_row

    rng = np.random.default_rng(0)
    steps = []
    for _ in range(n_requests):
        lp = np.log(rng.dirichlet(np.ones(vocab) * 0.3)).astype(np.float32)
        top = np.argsort(-lp)[:k]
        actual = rng.integers(vocab, size=n_gen)
        steps.append([(np.concatenate([[a], top]), lp[np.concatenate([[a], top])], int((lp >= lp[a]).sum())) for a in actual])

    def fill(flat):
        t = time.process_time()
        outs = []
        for req in steps:
            c = create_sample_logprobs(flat)
            for ids, lps, rank in req:  # as vLLM's output processor does per step: arrays .tolist()'d
                append_logprobs_for_next_position(c, ids.tolist(), lps.tolist(), [None] * (k + 1), rank, k)
            comp = CompletionOutput(index=0, text="", token_ids=[int(s[0][0]) for s in req], cumulative_logprob=None, logprobs=c, finish_reason="length")
            outs.append(RequestOutput("r", "", [1, 2, 3], None, [comp], finished=True))
        return outs, time.process_time() - t

    dict_outs, dict_fill = fill(False)
    flat_outs, flat_fill = fill(True)
    t = time.process_time()
    rows = [to_signal_row({"id": "a", "split": "", "prompt": "", "source": "", **vLLMOutputData.from_vllm_engine_output(o).model_dump()}, k, "generate")
            for o in dict_outs]
    dict_convert = time.process_time() - t
    t = time.process_time()
    cols = signal_columns([signals_from_output(o, k, "generate", [1, 2, 3], 3)[0] for o in flat_outs], k)
    pa.table(cols)
    flat_convert = time.process_time() - t
    n = n_requests * n_gen
    us = lambda s: round(1e6 * s / n, 2)  # noqa: E731
    return {"vllm_fill_dicts": us(dict_fill), "vllm_fill_flat": us(flat_fill), "convert_dict_path": us(dict_convert), "convert_array_path": us(flat_convert)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny:teacher", help="teacher: a HF directory or a builtin")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=8, help="top-k kept in the throughput comparison (unsuffixed keys)")
    ap.add_argument("--extra-k", default="32", help="more top-k values for the throughput comparison, comma-separated ('' for none); keys get _k<K>")
    ap.add_argument("--cpu-threads-bind", default="auto", help="teacher.cpu_threads_bind of both paths (vLLM-CPU thread binding)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--corpus", default=str(ROOT / "configs/data/tiny_prompts.jsonl"), help="JSONL with a prompt field")
    ap.add_argument("--shard-rows", type=int, default=256,
                    help="rows per Parquet file in the storage figures (the stage's teacher_pass.shard_rows; default = its default)")
    ap.add_argument("--storage-only", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--throughput-only", action="store_true", help="skip the storage figures")
    ap.add_argument("--gemma-storage", action="store_true",
                    help="also the storage figures of the Gemma 3 270M teacher (k = 50, the quickstart's prompts): bytes_per_token_k50_gemma")
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
            for k in [args.k] + [int(x) for x in args.extra_k.split(",") if x.strip()]:
                figures[f"conversion_us_per_token_k{k}"] = conversion_us_per_token(k)
                print(f"[conversion k={k}] us per generated token: {figures[f'conversion_us_per_token_k{k}']}", flush=True)
            figures.update(throughput(args, prompts, model, work, args.k))
            for k in (int(x) for x in args.extra_k.split(",") if x.strip()):
                figures.update({f"{name}_k{k}": v for name, v in throughput(args, prompts, model, work, k).items()})
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
        print("\n| k | ratio | steady_ratio | frontend host CPU us/token: stage / bare | engine core us/token: stage / bare | start-up s: stage / bare (extra) |\n|---|---|---|---|---|---|")
        for k, sfx in [(args.k, "")] + [(int(x), f"_k{int(x)}") for x in args.extra_k.split(",") if x.strip()]:
            g = lambda name: f.get(name + sfx)  # noqa: E731
            print(f"| {k} | {g('ratio')} | {g('steady_ratio')} | {g('stage_host_cpu_us_per_token')} / {g('bare_host_cpu_us_per_token')} | "
                  f"{g('stage_engine_core_cpu_us_per_token')} / {g('bare_engine_core_cpu_us_per_token')} | "
                  f"{g('raydistill_fixed_seconds')} / {g('bare_fixed_seconds')} ({g('startup_extra_s')}) |")
        print(f"\ntimelines (s from spawn): bare {f['bare_timeline']}; stage {f['raydistill_timeline']}")
    for k, st in storage.items():
        figures.update({f"bytes_per_token_k{k}": round(st["bytes"], 1), f"kl_k{k}": st["kl"], f"column_bytes_per_token_k{k}": st["columns"],
                        f"later_shards_bytes_per_token_k{k}": None if st["later_bytes"] is None else round(st["later_bytes"], 1),
                        f"encode_us_per_token_k{k}": round(st["encode_us"], 1), f"decode_us_per_token_k{k}": round(st["decode_us"], 1),
                        f"parquet_layout_k{k}": {n: round(v, 1) if n != "kl" else v for n, v in st["parquet_layout"].items()}})
    if not storage:
        print("\n(storage figures skipped: --throughput-only)")
    else:
        print(f"\n| k | layout | bytes / target token ({args.shard_rows}-row shards) | shards after the first | KL stored vs exact (nats/token) | "
              "encode + write / read + decode, CPU us per token | by column |\n|---|---|---|---|---|---|---|")
    for k, st in storage.items():
        later = "-" if st["later_bytes"] is None else f"{st['later_bytes']:.1f}"
        print(f"| {k} | coded (v7) | {st['bytes']:.1f} | {later} | {st['kl']:.2e} | {st['encode_us']:.1f} / {st['decode_us']:.1f} | "
              f"{', '.join(f'{n} {v}' for n, v in st['columns'].items())} |")
        v6 = st["parquet_layout"]
        print(f"| {k} | Parquet (v6) | {v6['bytes']:.1f} | | {v6['kl']:.2e} | {v6['encode_us']:.1f} / {v6['decode_us']:.1f} | |")
    if args.gemma_storage:
        figures.update(gemma_storage(args))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # vLLM-CPU's engine-core process can hang interpreter teardown after the figures are out;
    # nothing is left to clean up that the OS does not.
    os._exit(code)
