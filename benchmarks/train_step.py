"""Trainer micro-benchmarks, each side by side in one run.

1. Throughput: training-step tokens/s of the same student on the same batches with (a) CE only
   and (b) top-k KD + CE (the trainer's loss), both through the same chunked LM-head path.
   Figure: ``kd_over_ce_ratio`` = (b) / (a).
2. Loss memory: peak extra memory and time of one forward+backward of the loss at a Gemma 3
   vocabulary (V = 262,144, H = 640) for the chunked loss, fused (gradients computed in the
   forward pass; the trainer's path under ZeRO 0-2) and checkpointed (logits recomputed in
   backward; its path under ZeRO-3), versus the naive full-logits loss.
   Each variant runs in a fresh subprocess and its peak RSS above the inputs' baseline is read
   from getrusage (CPU) or torch.cuda.max_memory_allocated (GPU).
   Figures: ``loss_memory_ratio`` = fused / naive, ``loss_time_ratio`` = fused / naive, and the
   same for the checkpointed path (``checkpointed_memory_ratio``, ``checkpointed_time_ratio``).
3. Loss kernels: forward + backward of the per-token loss alone on one chunk of logits
   ([chunk, V]): fused CE (``F.cross_entropy``), the KD + CE loss as the trainer runs it, and the
   same loss with the student's log-softmax at the top-k ids built from plain autograd
   (``z.gather(ids) - logsumexp(z)``, the implementation before ``_LogSoftmaxAt``).
   Figures: ``kd_loss_over_ce_loss`` and ``autograd_over_fused_logsoftmax``.
4. Data-parallel scaling: the real train stage (Ray Train + DeepSpeed ZeRO-2, the trainer's own
   loop) on the same synthetic signals with 1 and then 2 workers, each worker taking its share of
   the host's cores. Global tokens/s is the median over the steps after the first two.
   Figure: ``workers_2_over_1`` = tokens/s with 2 workers / with 1.

    .venv/bin/python benchmarks/train_step.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from raydistill.distill.losses import chunked_distill_loss_sums, cross_entropy, distill_token_losses, fused_linear_loss_sums


def fake_teacher(n: int, vocab: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] distinct top-k ids and their sorted log-probs holding ~90% of the mass."""
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    probs = torch.softmax(torch.randn(n, k, generator=gen) * 2, -1).sort(-1, descending=True).values * 0.9
    return ids, probs.log()


def chunked_ce_sum(hidden, lm_head, targets, chunk_tokens):
    """CE-only twin of ``chunked_distill_loss_sums``: the same fused chunked LM-head path."""

    def ce_sums(logits, t):
        ce = cross_entropy(logits, t).sum()
        return ce, ce.detach(), ce.detach()

    return fused_linear_loss_sums(hidden, lm_head, ce_sums, chunk_tokens, targets)[0]


def throughput(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = LlamaConfig(vocab_size=args.tp_vocab, hidden_size=args.tp_hidden, intermediate_size=args.tp_hidden * 2,
                         num_hidden_layers=args.tp_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = []
    for _ in range(args.tp_steps):
        ids = torch.randint(0, args.tp_vocab, (args.batch, args.seq), generator=gen)
        n = args.batch * (args.seq - 1)
        topk_ids, topk_lp = fake_teacher(n, args.tp_vocab, args.k, gen)
        batches.append((ids, topk_ids, topk_lp))

    def step(ids, topk_ids, topk_lp, kd: bool):
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, config.hidden_size)
        targets = ids[:, 1:].reshape(-1)
        if kd:
            # More tokens than one chunk, so this is the fused path, like the CE twin's.
            total, _, _ = chunked_distill_loss_sums(hidden, model.lm_head, targets, topk_ids, topk_lp, "forward_kl", 0.1,
                                                    chunk_tokens=args.chunk_tokens)
        else:
            total = chunked_ce_sum(hidden, model.lm_head, targets, args.chunk_tokens)
        (total / targets.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return targets.numel()

    out = {}
    for _ in range(2):  # warm-up round, then alternate the two modes so drift hits both equally
        timings = {"ce": [0.0, 0], "kd_ce": [0.0, 0]}
        for b in batches:
            for mode in ("ce", "kd_ce"):
                t0 = time.perf_counter()
                n = step(*b, kd=mode == "kd_ce")
                timings[mode][0] += time.perf_counter() - t0
                timings[mode][1] += n
        out = {m: tokens / secs for m, (secs, tokens) in timings.items()}
    return {
        "student": {"vocab": args.tp_vocab, "hidden": args.tp_hidden, "layers": args.tp_layers, "batch": args.batch, "seq": args.seq,
                    "top_k": args.k, "steps": args.tp_steps},
        "ce_tokens_per_s": out["ce"],
        "kd_ce_tokens_per_s": out["kd_ce"],
        "kd_over_ce_ratio": out["kd_ce"] / out["ce"],
    }


def loss_kernels(args) -> dict:
    """Median milliseconds of loss forward+backward on one [chunk, V] block of logits, three ways, alternated."""
    from raydistill.distill import losses

    gen = torch.Generator().manual_seed(1)
    n, vocab = args.chunk_tokens, args.tp_vocab
    logits = torch.randn(n, vocab, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    topk_ids, topk_lp = fake_teacher(n, vocab, args.k, gen)
    fused = losses._LogSoftmaxAt.apply

    def autograd_at(z, idx):  # the composition autograd differentiates pass by pass
        log_z = torch.logsumexp(z, dim=-1, keepdim=True)
        return z.gather(-1, idx) - log_z, log_z

    def kd(at):
        def run():
            losses._LogSoftmaxAt.apply = at
            try:
                total, _, _ = distill_token_losses(logits, targets, topk_ids, topk_lp, "forward_kl", 0.1)
                torch.autograd.grad(total.sum(), logits)
            finally:
                losses._LogSoftmaxAt.apply = fused
        return run

    def ce():
        torch.autograd.grad(cross_entropy(logits, targets).sum(), logits)

    runs = {"ce": ce, "kd_fused": kd(fused), "kd_autograd": kd(autograd_at)}
    times = {name: [] for name in runs}
    for rep in range(args.kernel_repeats + 2):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1e3 * sorted(v)[len(v) // 2] for name, v in times.items()}
    return {"chunk_tokens": n, "vocab": vocab, "top_k": args.k, "median_ms": ms,
            "kd_loss_over_ce_loss": ms["kd_fused"] / ms["ce"], "autograd_over_fused_logsoftmax": ms["kd_autograd"] / ms["kd_fused"]}


def _scaling_student(root: Path, args) -> str:
    """The throughput student saved as a HF directory, with the tiny builtin tokenizer (ids < 512)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raydistill.models import resolve_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.tp_vocab, hidden_size=args.tp_hidden, intermediate_size=args.tp_hidden * 2,
                         num_hidden_layers=args.tp_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    out = root / "student"
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve_model("tiny:student")).save_pretrained(out)
    return str(out)


def _scaling_signals(root: Path, student: str, rows: int, args) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from raydistill.data.signals import LOGPROB_SCALE, SIGNAL_SCHEMA, encode_signals, tokenizer_fingerprint, write_signal_meta

    gen = torch.Generator().manual_seed(1)
    out = root / "signals"
    out.mkdir()
    records = []
    for i in range(rows):
        ids = torch.randint(0, 512, (args.seq,), generator=gen).tolist()
        topk_ids, topk_lp = fake_teacher(args.seq - 1, args.tp_vocab, args.k, gen)
        records.append({"id": f"r{i}", "split": "train", "input_ids": ids, "target_start": 1, "topk_ids": topk_ids.tolist(),
                        "topk_logprobs": topk_lp.tolist(), "prompt": "", "response": ""})
    pq.write_table(encode_signals(pa.Table.from_pylist(records, schema=SIGNAL_SCHEMA)), out / "part-0.parquet")
    write_signal_meta(out, {"teacher": "synthetic", "tokenizer_fingerprint": tokenizer_fingerprint(AutoTokenizer.from_pretrained(student)),
                            "top_k": args.k, "mode": "score", "logprob_scale": LOGPROB_SCALE})
    return str(out)


def worker_scaling(args) -> dict:
    import statistics
    import tempfile

    import ray

    from raydistill.distill.train import run_train_stage
    from raydistill.jobs.rundir import RunDir
    from raydistill.spec import DistillSpec, TrainSpec

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student = _scaling_student(root, args)
        signals = _scaling_signals(root, student, 2 * args.batch * args.scaling_steps, args)
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        try:
            for workers in (1, 2):
                train = TrainSpec(workers=workers, zero_stage=2, micro_batch_size=args.batch, max_steps=args.scaling_steps,
                                  checkpoint_every=args.scaling_steps, max_seq_len=args.seq, loss_chunk_tokens=args.chunk_tokens)
                run_dir = root / f"run{workers}"
                run_train_stage(train, DistillSpec(ce_weight=0.1), student, signals, RunDir(run_dir))
                steps = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
                results[workers] = statistics.median(m["tokens_per_s"] for m in steps[2:])
        finally:
            ray.shutdown()
    return {"steps": args.scaling_steps, "micro_batch_per_worker": args.batch, "seq": args.seq,
            "tokens_per_s_1_worker": results[1], "tokens_per_s_2_workers": results[2], "workers_2_over_1": results[2] / results[1]}


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def loss_memory_child(variant: str, tokens: int, vocab: int, hidden_size: int, chunk_tokens: int, device: str) -> dict:
    """One forward+backward of the loss; runs in its own process so peak memory is its own."""
    torch.manual_seed(0)  # the same LM head in both subprocesses, so their losses compare
    gen = torch.Generator().manual_seed(0)
    lm_head = torch.nn.Linear(hidden_size, vocab, bias=False).to(device)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    topk_ids, topk_lp = (t.to(device) for t in fake_teacher(tokens, vocab, 8, gen))
    # Warm the allocator and the kernels on a sliver, then measure from a clean baseline.
    distill_token_losses(lm_head(hidden[:8]), targets[:8], topk_ids[:8], topk_lp[:8], ce_weight=0.1)[0].sum().backward()
    lm_head.weight.grad = None
    hidden.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else _peak_bytes(device)
    t0 = time.perf_counter()
    if variant == "naive":
        total, _, _ = distill_token_losses(lm_head(hidden), targets, topk_ids, topk_lp, ce_weight=0.1)
        total = total.sum()
    else:  # "fused" (the trainer's path under ZeRO 0-2) or "checkpointed" (under ZeRO-3)
        total, _, _ = chunked_distill_loss_sums(hidden, lm_head, targets, topk_ids, topk_lp, ce_weight=0.1, chunk_tokens=chunk_tokens,
                                                always_recompute=variant == "checkpointed")
    (total / tokens).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"variant": variant, "peak_extra_bytes": _peak_bytes(device) - base, "seconds": seconds, "loss": float(total) / tokens}


def loss_memory(args) -> dict:
    results = {}
    for variant in ("naive", "fused", "checkpointed"):
        cmd = [sys.executable, __file__, "--child", variant, "--mem-tokens", str(args.mem_tokens), "--mem-vocab", str(args.mem_vocab),
               "--mem-hidden", str(args.mem_hidden), "--chunk-tokens", str(args.chunk_tokens), "--device", args.device]
        results[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    naive, fused, ckpt = results["naive"], results["fused"], results["checkpointed"]
    return {
        "tokens": args.mem_tokens,
        "vocab": args.mem_vocab,
        "hidden": args.mem_hidden,
        "chunk_tokens": args.chunk_tokens,
        "naive_peak_gib": naive["peak_extra_bytes"] / 2**30,
        "fused_peak_gib": fused["peak_extra_bytes"] / 2**30,
        "checkpointed_peak_gib": ckpt["peak_extra_bytes"] / 2**30,
        "naive_seconds": naive["seconds"],
        "fused_seconds": fused["seconds"],
        "checkpointed_seconds": ckpt["seconds"],
        "loss_memory_ratio": fused["peak_extra_bytes"] / naive["peak_extra_bytes"],
        "loss_time_ratio": fused["seconds"] / naive["seconds"],
        "checkpointed_memory_ratio": ckpt["peak_extra_bytes"] / naive["peak_extra_bytes"],
        "checkpointed_time_ratio": ckpt["seconds"] / naive["seconds"],
        "loss_values_match": all(abs(naive["loss"] - v["loss"]) <= 1e-4 * max(1.0, abs(naive["loss"])) for v in (fused, ckpt)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tp-vocab", type=int, default=32768)
    p.add_argument("--tp-hidden", type=int, default=256)
    p.add_argument("--tp-layers", type=int, default=2)
    p.add_argument("--tp-steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=129)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--mem-tokens", type=int, default=1024, help="B*T of the loss-memory comparison (the issue asks 8192 where memory allows)")
    p.add_argument("--mem-vocab", type=int, default=262144)
    p.add_argument("--mem-hidden", type=int, default=640)
    p.add_argument("--chunk-tokens", type=int, default=1024 // 8)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--kernel-repeats", type=int, default=20, help="timed rounds of the loss-kernel comparison")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-workers", action="store_true")
    p.add_argument("--scaling-steps", type=int, default=8, help="optimizer steps per worker count in the scaling run")
    p.add_argument("--child", choices=["naive", "fused", "checkpointed"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(loss_memory_child(args.child, args.mem_tokens, args.mem_vocab, args.mem_hidden, args.chunk_tokens, args.device)))
        return 0

    figures = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                           "device": args.device, "torch": torch.__version__},
               "command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    if not args.skip_throughput:
        figures["throughput"] = throughput(args)
        figures["kd_over_ce_ratio"] = figures["throughput"]["kd_over_ce_ratio"]
        print(json.dumps(figures["throughput"], indent=2), flush=True)
    if not args.skip_kernels:
        figures["loss_kernels"] = loss_kernels(args)
        print(json.dumps(figures["loss_kernels"], indent=2), flush=True)
    if not args.skip_memory:
        figures["loss_memory"] = loss_memory(args)
        figures["loss_memory_ratio"] = figures["loss_memory"]["loss_memory_ratio"]
        print(json.dumps(figures["loss_memory"], indent=2), flush=True)
    if not args.skip_workers:
        figures["workers"] = worker_scaling(args)
        figures["workers_2_over_1"] = figures["workers"]["workers_2_over_1"]
        print(json.dumps(figures["workers"], indent=2), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
