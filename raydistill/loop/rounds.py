"""The adaptive data loop (``loop:``): train, measure where the student trails the teacher, re-weight and replay, repeat.

With ``loop.rounds`` > 1 the train stage runs rounds instead of one training run:

- round 0 trains the student on every training row, as a run without the loop does;
- each later round r first measures the gap of round r - 1's student on a held-out slice of each
  domain (per-row KL, NLL and top-1 agreement against the stored signals: a student forward pass,
  no teacher call; ``raydistill.eval.stage.score_rows``), then applies ``loop.policy`` to choose
  ``loop.rows_per_round`` training rows (``raydistill.loop.policies``), and trains on them from
  round r - 1's student for ``train.max_steps`` steps.

Each round lives under ``RUN/rounds/<r>/``, a run directory of its own (its ``signals`` holds the
chosen rows, its ``manifest.json`` the round's steps ``gap``, ``select`` and ``train``, its
``checkpoints`` Ray Train's), so a killed loop re-run skips the rounds and steps that finished and
resumes training from the round's last checkpoint. The last round's student is exported to
``RUN/student``; the per-domain gaps and weights of every round go to the train stage's outputs in
the run's manifest, and to ``RUN/rounds/report.md`` with two plots.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.data.signals import META_FILE, PARQUET_WRITE_ARGS, load_signals, shard_files
from raydistill.fileio import write_atomic
from raydistill.jobs.manifest import Manifest
from raydistill.jobs.rundir import RunDir
from raydistill.loop import policies
from raydistill.loop.expand import expand_round, expanded_rows
from raydistill.loop.gap import domain_gaps
from raydistill.spec import EvalSpec, JobSpec, LoopSpec

# The domain of every row when the corpus has no data.domain_field: one domain, and the loop only replays.
ALL = "all"


def round_run(run: RunDir, r: int) -> RunDir:
    return RunDir.of(run.root / "rounds" / str(r))


def _step(manifest: Manifest, name: str, fn) -> dict:
    """Run ``fn() -> outputs`` as the round's step ``name`` unless the round's manifest says it finished."""
    entry = manifest.entry(name)
    if entry.get("status") == "succeeded":
        return entry["outputs"]
    with manifest.stage(name) as out:
        out.update(fn())
    return out


def row_domains(signals_dir: Path) -> dict[str, dict[str, list[str]]]:
    """split -> domain -> the ids of its rows (sorted); one domain ``ALL`` when the signals carry no ``domain``."""
    stored = pq.ParquetDataset(shard_files(signals_dir)).schema.names
    columns = ["id", "split"] + (["domain"] if "domain" in stored else [])
    table = load_signals(signals_dir, columns)
    domains = table["domain"].to_pylist() if "domain" in columns else [ALL] * table.num_rows
    out: dict[str, dict[str, list[str]]] = {}
    for i, split, d in zip(table["id"].to_pylist(), table["split"].to_pylist(), domains):
        out.setdefault(split, {}).setdefault(d, []).append(i)
    return {s: {d: sorted(ids) for d, ids in by.items()} for s, by in out.items()}


def held_out_slice(eval_rows: dict[str, list[str]], per_domain: int) -> set[str]:
    """The first ``per_domain`` held-out ids of each domain (sorted ids: the same slice every round)."""
    return {i for ids in eval_rows.values() for i in ids[:per_domain]}


def measure(eval_spec: EvalSpec, max_seq_len: int, student: str, signals_dir: Path, split: str, ids: set[str] | None = None) -> dict:
    """Per-row gap sums of ``student`` on ``split`` rows (optionally only ``ids``): {id: (domain, tokens, kl, nll, top1_agree)}."""
    from raydistill.eval.stage import score_rows

    has_domain = "domain" in pq.ParquetDataset(shard_files(signals_dir)).schema.names
    batches = score_rows(eval_spec, max_seq_len, student, None, signals_dir, ("domain",) if has_domain else (), split=split, ids=ids)
    rows = {}
    for b in batches:
        domains = b["domain"] if has_domain else [ALL] * len(b["id"])
        for i, d, t, kl, nll, agree in zip(b["id"], domains, b["tokens"], b["kl"], b["student_nll"], b["top1_agree"]):
            rows[str(i)] = (str(d), int(t), float(kl), float(nll), float(agree))
    return rows


def gaps_of(rows: dict) -> dict[str, dict[str, float]]:
    """Per-row sums (``measure``) -> per domain: rows, tokens, mean KL, NLL and top-1 agreement (``domain_gaps``)."""
    values = list(rows.values())
    sums = {"tokens": [v[1] for v in values], "kl": [v[2] for v in values], "nll": [v[3] for v in values], "top1_agree": [v[4] for v in values]}
    return domain_gaps([v[0] for v in values], sums)


def next_weights(loop: LoopSpec, weights: dict[str, float], gaps: dict[str, dict], train_rows: dict[str, list[str]]) -> dict[str, float]:
    """The domain weights of the next round: DDK's update of the last ones by the measured KL, or the domains' row shares."""
    if "ddk" in loop.policies:
        measured = {d: g["kl"] for d, g in gaps.items() if d in train_rows and math.isfinite(g["kl"])}
        # A domain with training rows but no held-out row keeps its weight's share of the update's prior.
        return policies.ddk_update(weights, measured, loop.ddk.beta, loop.ddk.temperature) if measured else dict(weights)
    total = sum(len(v) for v in train_rows.values())
    return {d: len(v) / total for d, v in train_rows.items()}


def choose_rows(loop: LoopSpec, weights: dict[str, float], train_rows: dict[str, list[str]], train_scores: dict | None, budget: int, seed: int,
                new_rows: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Per domain, the ids of the next round's training rows (repeats allowed): the budget split by ``weights``;
    with ``hard``, a ``loop.hard.fraction`` of each domain's share replays its hardest rows; ``new_rows`` (expand's,
    per domain) come next, each once as far as the share goes; the rest is drawn evenly."""
    counts = policies.allocate({d: weights.get(d, 0.0) for d in train_rows}, budget)
    hard_counts = {d: round(loop.hard.fraction * n) if "hard" in loop.policies else 0 for d, n in counts.items()}
    new = {d: list((new_rows or {}).get(d, []))[: counts[d] - hard_counts[d]] for d in counts}
    drawn = policies.balanced_sample(train_rows, {d: counts[d] - hard_counts[d] - len(new[d]) for d in counts}, seed)
    out = {}
    for d, ids in drawn.items():
        picked = []
        if hard_counts[d]:
            hardest = ranked_rows(train_rows, train_scores, loop.hard.criterion)[d]
            picked = [hardest[j % len(hardest)] for j in range(hard_counts[d])] if hardest else []
        out[d] = picked + new[d] + ids
    return out


def ranked_rows(train_rows: dict[str, list[str]], train_scores: dict, criterion: str) -> dict[str, list[str]]:
    """Per domain, its scorable training rows, hardest first by ``criterion``."""
    return {d: policies.select_hard(ids, [_hardness(train_scores[i], criterion) for i in ids], 1.0) for d, ids in train_rows.items()}


def _hardness(row: tuple, criterion: str) -> float:
    _, tokens, kl, _, agree = row
    if not tokens:
        return float("nan")
    return kl / tokens if criterion == "kl" else 1.0 - agree / tokens


def write_round_signals(signals_dir: Path, ids: list[str], out_dir: Path, new_dir: Path | None = None,
                        labels: dict[str, tuple[str, int]] | None = None) -> int:
    """The chosen training rows (in order, repeats kept) of ``signals_dir`` as a signals directory of their own.

    Stored rows are copied as they are (same encoding and metadata, nothing decoded); the whole
    stored table is read in the driver, which suits the corpora one loop round replays. Rows of
    ``new_dir`` (expand's signals, encoded with their own models) are decoded and encoded again with
    ``signals_dir``'s, and get their ``parent_id`` and ``round`` from ``labels``.
    """
    table = pq.ParquetDataset(shard_files(signals_dir)).read()
    if new_dir is not None and labels:
        table = _with_new_rows(table, signals_dir, new_dir, labels)
    where = {i: n for n, i in enumerate(table["id"].to_pylist())}
    missing = [i for i in ids if i not in where]
    if missing:
        raise ValueError(f"rows {missing[:5]} are not in {signals_dir}")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copy(Path(signals_dir) / META_FILE, out_dir / META_FILE)
    pq.write_table(table.take(pa.array([where[i] for i in ids], pa.int64())), out_dir / "round-00000.parquet", **PARQUET_WRITE_ARGS)
    return len(ids)


def _with_new_rows(table: pa.Table, signals_dir: Path, new_dir: Path, labels: dict[str, tuple[str, int]]) -> pa.Table:
    from raydistill.data.signals import FULL_SIGNAL_COLUMNS, encode_signals, read_signal_meta, signal_codec, target_step_bias

    meta, new_meta = read_signal_meta(signals_dir), read_signal_meta(new_dir)
    if meta.get("tokenizer_fingerprint") != new_meta.get("tokenizer_fingerprint"):
        raise ValueError(f"{new_dir} was written with another tokenizer than {signals_dir}")
    stored_new = pq.ParquetDataset(shard_files(new_dir)).schema.names
    columns = FULL_SIGNAL_COLUMNS + [c for c in ("teacher", "domain") if c in table.column_names and c in stored_new]
    new = load_signals(new_dir, columns, ids=sorted(labels))
    new = new.append_column("parent_id", pa.array([labels[i][0] for i in new["id"].to_pylist()], pa.string()))
    new = new.append_column("round", pa.array([labels[i][1] for i in new["id"].to_pylist()], pa.int32()))
    stored = encode_signals(new, meta["logprob_scale"], meta.get("topk_id_order", ()), target_step_bias(meta), signal_codec(meta))
    if "target_logprob_step" in stored.column_names and "target_logprob_step" not in table.column_names:
        stored = stored.drop_columns(["target_logprob_step"])
    return pa.concat_tables([table, stored], promote_options="permissive")


def run_loop(spec: JobSpec, run: RunDir, train_round, teacher_pass=None) -> dict:
    """All rounds; ``train_round(round_run, student_path_or_None, first: bool) -> train outputs`` trains one;
    ``teacher_pass`` (``raydistill.loop.expand.TeacherPass``) runs the teacher passes of the ``expand`` policy.

    Returns the train stage's outputs: the last round's, plus ``rounds`` (per round: the gaps measured
    before it, the weights and rows it trained on).
    """
    loop, signals = spec.loop, run.signals
    rows = row_domains(signals)
    train_rows, eval_rows = rows.get("train", {}), rows.get("eval", {})
    if not train_rows:
        raise ValueError(f"no training rows in {signals}")
    slice_ids = held_out_slice(eval_rows, loop.gap_rows_per_domain)
    if not slice_ids:
        raise ValueError(f"loop: no held-out rows in {signals} to measure the gap on; raise data.eval_fraction")
    budget = loop.rows_per_round or sum(len(v) for v in train_rows.values())
    total = sum(len(v) for v in train_rows.values())
    weights = {d: len(v) / total for d, v in train_rows.items()}
    history = []
    student = None
    out: dict = {}
    for r in range(loop.rounds):
        rr = round_run(run, r)
        manifest = Manifest(rr.root)
        record: dict = {"round": r}
        if r == 0:
            record.update(weights=weights, rows=total)
            out = _step(manifest, "train", lambda: train_round(rr, None, True))
        else:
            gap = _step(manifest, "gap", lambda: {"gaps": gaps_of(measure(spec.eval, spec.train.max_seq_len, student, signals, "eval", slice_ids))})
            gaps = gap["gaps"]

            expand_dir = rr.root / "expand"
            if "expand" in loop.policies:
                def expand(gaps=gaps, r=r, weights=weights):
                    scores = measure(spec.eval, spec.train.max_seq_len, student, signals, "train")
                    return expand_round(spec, r, expand_dir, ranked_rows(train_rows, scores, loop.hard.criterion),
                                        next_weights(loop, weights, gaps, train_rows), train_rows, signals, teacher_pass)

                record["expand"] = _step(manifest, "expand", expand)

            def select(gaps=gaps, r=r, weights=weights):
                scores = measure(spec.eval, spec.train.max_seq_len, student, signals, "train") if "hard" in loop.policies else None
                new = next_weights(loop, weights, gaps, train_rows)
                new_rows, labels = expanded_rows(expand_dir) if "expand" in loop.policies else ({}, {})
                chosen = choose_rows(loop, new, train_rows, scores, budget, loop.seed + r, new_rows)
                n = write_round_signals(signals, [i for d in sorted(chosen) for i in chosen[d]], rr.signals, expand_dir / "signals", labels)
                return {"weights": new, "rows": n, "rows_by_domain": {d: len(v) for d, v in chosen.items()},
                        "new_rows": sum(1 for v in chosen.values() for i in v if i in labels)}

            chosen = _step(manifest, "select", select)
            weights = chosen["weights"]
            record.update(gaps={d: g["kl"] for d, g in gaps.items()}, gap_detail=gaps, weights=weights, rows=chosen["rows"],
                          rows_by_domain=chosen["rows_by_domain"], new_rows=chosen.get("new_rows", 0))
            out = _step(manifest, "train", lambda: train_round(rr, student, False))
            print(f"[train] loop round {r}: gaps " + ", ".join(f"{d} {g['kl']:.3f}" for d, g in sorted(gaps.items()))
                  + "; weights " + ", ".join(f"{d} {w:.2f}" for d, w in sorted(weights.items())), flush=True)
        student = out["student_dir"]
        history.append(record)
    final = _step(Manifest(round_run(run, loop.rounds - 1).root), "final_gap",
                  lambda: {"gaps": gaps_of(measure(spec.eval, spec.train.max_seq_len, student, signals, "eval", slice_ids))})
    history.append({"round": loop.rounds, "gaps": {d: g["kl"] for d, g in final["gaps"].items()}, "gap_detail": final["gaps"], "after_training": True})
    if run.student.exists():
        shutil.rmtree(run.student)
    shutil.copytree(student, run.student)
    write_loop_report(history, run.root / "rounds")
    return {**out, "student_dir": str(run.student), "rounds": history}


def write_loop_report(history: list[dict], out_dir: Path) -> None:
    """``report.md`` (gap per domain per round, and the weights) and ``gaps.png`` / ``weights.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [h for h in history if "gaps" in h]
    domains = sorted({d for h in measured for d in h["gaps"]})
    lines = ["# The adaptive loop", "", "Held-out KL (teacher || student, nats/token) of the student that entered each round "
             "(the last row: the final student), and the domain weights the round trained with.", "",
             "| round | " + " | ".join(f"KL {d}" for d in domains) + " | " + " | ".join(f"weight {d}" for d in domains) + " | rows |",
             "|---|" + "---|" * (2 * len(domains) + 1)]
    for h in history:
        kl = [f"{h['gaps'][d]:.4f}" if d in h.get("gaps", {}) else "" for d in domains]
        w = [f"{h['weights'][d]:.3f}" if d in h.get("weights", {}) else "" for d in domains]
        name = "final" if h.get("after_training") else str(h["round"])
        lines.append(f"| {name} | " + " | ".join(kl + w) + f" | {h.get('rows', '')} |")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "report.md", "\n".join(lines) + "\n\n![gap](gaps.png)\n![weights](weights.png)\n")
    for name, key, label in (("gaps.png", "gaps", "held-out KL (nats/token)"), ("weights.png", "weights", "sampling weight")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for d in domains:
            points = [(h["round"], h[key][d]) for h in history if d in h.get(key, {})]
            if points:
                ax.plot(*zip(*points), marker="o", label=d)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
    write_atomic(out_dir / "rounds.json", json.dumps(history, indent=2))

