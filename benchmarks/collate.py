"""What collating a micro-batch costs per target token: ``collate_rowwise`` (per token) versus ``collate`` (vectorised).

Run from the repository root:

    .venv/bin/python benchmarks/collate.py [--rows 8] [--seq-len 512] [--k 8 32] [--repeats 30] [--json PATH]

One synthetic signal batch per k, shaped like a training micro-batch: ``--rows`` rows of about
``--seq-len`` tokens (some longer, so truncation at max_seq_len = ``--seq-len`` is exercised),
prompts of 32-160 tokens, a top-k entry per position from the target start. Both functions get
the batch as the training loop does today (``iter_batches(batch_format="numpy")``: object arrays
of arrays); the vectorised one is also timed on the Arrow batch (``batch_format="pyarrow"``), and
the Arrow -> numpy conversion Ray does for the numpy format is timed on its own, since it too
costs per position. Calls alternate old/new, and each figure is the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raydistill.data.collate import collate, collate_rowwise  # noqa: E402
from raydistill.data.signals import SIGNAL_SCHEMA  # noqa: E402

COLUMNS = ["input_ids", "target_start", "topk_ids", "topk_logprobs"]


def make_batch(rng, rows: int, seq_len: int, k: int) -> pa.Table:
    lengths = rng.integers(seq_len - seq_len // 8, seq_len + seq_len // 8, rows)
    starts = rng.integers(32, 160, rows)
    cols = {
        "input_ids": [rng.integers(0, 150_000, n, dtype=np.int32) for n in lengths],
        "target_start": starts.astype(np.int32),
        "topk_ids": [list(rng.integers(0, 150_000, (n - s, k), dtype=np.int32)) for n, s in zip(lengths, starts)],
        "topk_logprobs": [list((-rng.exponential(2.0, (n - s, k))).astype(np.float32)) for n, s in zip(lengths, starts)],
    }
    return pa.table(cols, schema=pa.schema([SIGNAL_SCHEMA.field(c) for c in COLUMNS]))


def numpy_batch(table: pa.Table) -> dict:
    """What ``iter_batches(batch_format="numpy")`` yields (Ray's ArrowBlockAccessor.to_numpy)."""
    return {c: table[c].combine_chunks().to_numpy(zero_copy_only=False) for c in table.column_names}


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--k", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    results = []
    for k in args.k:
        table = make_batch(rng, args.rows, args.seq_len, k)
        batch = numpy_batch(table)
        old = collate_rowwise(batch, args.seq_len, 0)
        for new in (collate(batch, args.seq_len, 0), collate(table, args.seq_len, 0)):
            assert all(new[c].dtype == old[c].dtype and np.array_equal(new[c], old[c]) for c in old), "outputs differ"
        m = len(old["targets"])
        runs = {"old": [], "new_numpy": [], "new_arrow": [], "to_numpy": []}
        for _ in range(args.repeats):
            runs["old"].append(seconds(lambda: collate_rowwise(batch, args.seq_len, 0)))
            runs["new_numpy"].append(seconds(lambda: collate(batch, args.seq_len, 0)))
            runs["new_arrow"].append(seconds(lambda: collate(table, args.seq_len, 0)))
            runs["to_numpy"].append(seconds(lambda: numpy_batch(table)))
        us = {name: statistics.median(v) * 1e6 / m for name, v in runs.items()}
        results.append({"k": k, "rows": args.rows, "target_tokens": m, "us_per_target_token": us, "speedup_numpy": us["old"] / us["new_numpy"], "speedup_arrow": us["old"] / us["new_arrow"]})

    print(f"µs per target token (median of {args.repeats}; batch of {args.rows} rows, max_seq_len {args.seq_len})")
    print(f"{'k':>4} {'tokens':>7} {'collate':>9} {'vec(numpy)':>11} {'vec(arrow)':>11} {'speedup':>13} {'arrow->numpy':>13}")
    for r in results:
        us = r["us_per_target_token"]
        print(
            f"{r['k']:>4} {r['target_tokens']:>7} {us['old']:>9.3f} {us['new_numpy']:>11.3f} {us['new_arrow']:>11.3f} "
            f"{r['speedup_numpy']:>5.0f}x / {r['speedup_arrow']:>4.0f}x {us['to_numpy']:>13.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": args.rows, "seq_len": args.seq_len, "repeats": args.repeats, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
