"""Which teacher layers a depth-pruned student keeps: block influence against drop-one NLL, before training.

Both ``student.layer_scoring`` methods measure the teacher's layers on the first
``--calibration-rows`` training rows of a finished teacher pass (what ``student.layers: auto``
uses); for each ``--keep`` count, the layers each method chooses are cut out of the teacher in
memory and the pruned model's perplexity is measured on the held-out rows' teacher text (the
positions from ``target_start``), with no training. ``--hand`` adds a hand-picked list.

    .venv/bin/python benchmarks/layer_scoring.py --signals RUN/signals [--teacher gemma3-270m] \\
        [--keep 6,9,12,14] [--calibration-rows 16] [--hand 0,3,5,8,11,17] [--json layers.json]

Prints a table and the seconds each scoring took.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def heldout_nll(model, rows: list[tuple[list[int], int]]) -> float:
    """Mean NLL (nats/token) of ``model`` on each row's tokens from ``target_start`` on."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, start in rows:
            t = torch.tensor([ids])
            logp = model(input_ids=t, use_cache=False).logits[0, :-1].float().log_softmax(-1)
            nll = -logp.gather(-1, t[0, 1:, None])[:, 0][max(start, 1) - 1:]
            total += nll.double().sum().item()
            count += len(nll)
    return total / count


def _pruned_ppl(model, layers: list[int], heldout) -> float:
    from raydistill.distill.init import only_layers

    with only_layers(model, layers):
        return math.exp(heldout_nll(model, heldout))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--signals", required=True, help="a finished teacher pass's signals directory")
    parser.add_argument("--teacher", default="gemma3-270m", help="the teacher of those signals (a directory or a builtin)")
    parser.add_argument("--keep", default="6,9,12,14", help="comma-separated layer counts")
    parser.add_argument("--calibration-rows", type=int, default=16)
    parser.add_argument("--hand", help="a hand-picked comma-separated layer list to compare too")
    parser.add_argument("--json")
    args = parser.parse_args()

    import pyarrow.compute as pc
    import torch
    from transformers import AutoModelForCausalLM

    from raydistill.data.signals import load_signals
    from raydistill.distill.init import LAYER_SCORES, choose_layers
    from raydistill.distill.train import calibration_sequences
    from raydistill.models import resolve_model

    teacher = resolve_model(args.teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    calibration = calibration_sequences(args.signals, args.calibration_rows)
    table = load_signals(args.signals, columns=["split", "input_ids", "target_start"])
    table = table.filter(pc.equal(table["split"], "eval"))
    heldout = list(zip(table["input_ids"].to_pylist(), table["target_start"].to_pylist()))

    full = math.exp(heldout_nll(model, heldout))
    scores, seconds = {}, {}
    for method, score in LAYER_SCORES.items():
        t0 = time.perf_counter()
        scores[method] = score(model, calibration)
        seconds[method] = round(time.perf_counter() - t0, 1)
    rows = []
    for k in [int(x) for x in args.keep.split(",")]:
        row = {"keep": k}
        for method in LAYER_SCORES:
            layers = choose_layers(scores[method], k)
            row[method] = {"layers": layers, "perplexity": _pruned_ppl(model, layers, heldout)}
        rows.append(row)
    hand = None
    if args.hand:
        layers = [int(x) for x in args.hand.split(",")]
        hand = {"layers": layers, "perplexity": _pruned_ppl(model, layers, heldout)}

    print(f"teacher {args.teacher}: held-out perplexity {full:.2f} on {len(heldout)} rows; "
          f"scoring on {len(calibration)} calibration rows took " + ", ".join(f"{m} {s} s" for m, s in seconds.items()))
    print("| layers kept | block influence: layers | perplexity | drop one: layers | perplexity |")
    print("|---|---|---|---|---|")
    for row in rows:
        b, d = row["block_influence"], row["drop_one"]
        print(f"| {row['keep']} | {b['layers']} | {b['perplexity']:,.1f} | {d['layers']} | {d['perplexity']:,.1f} |")
    if hand:
        print(f"hand-picked {hand['layers']}: perplexity {hand['perplexity']:,.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "teacher": args.teacher, "signals": args.signals, "calibration_rows": len(calibration), "heldout_rows": len(heldout),
            "teacher_perplexity": full, "scores": scores, "scoring_seconds": seconds, "rows": rows, "hand": hand,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
