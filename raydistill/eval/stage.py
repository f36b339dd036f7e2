"""Eval stage: score the student and the teacher on the teacher's held-out responses.

Both models are scored the same way (a transformers forward pass over the teacher's own token
ids), so the NLLs are comparable. Scoring runs as a Ray Data actor stage over the eval signals;
the driver sums the per-row figures.

Several teachers (``routing`` in ``_signals.json``): with domain routing the per-row figures are
also summed per domain (``by_domain``); with an ensemble, the student alone is scored against each
teacher's own signals under ``signals/teachers/<name>`` as well (``kl_by_teacher``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pyarrow.compute as pc

from raydistill.spec import EvalSpec
from raydistill.fileio import write_atomic
from raydistill.jobs.rundir import RunDir

SCORE_COLUMNS = ("tokens", "student_nll", "teacher_nll", "kl", "top1_agree")
# Row labels a several-teacher run's signals carry (domain routing); the scorer passes them through
# untouched so that the driver can sum its per-row figures per domain.
GROUP_COLUMNS = ("teacher", "domain")


class PairScorer:
    """Ray Data actor: holds the student and the teacher, scores batches of signal rows.

    Without ``teacher_path`` no teacher model is loaded and no ``teacher_nll`` is produced: the KL
    is to the stored signals alone, which is all that scoring against another teacher's signals needs.
    """

    def __init__(self, student_path: str, teacher_path: str | None, max_seq_len: int, threads: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # As many threads as CPUs reserved for the actor, and no more: Ray sets OMP_NUM_THREADS=1 in
        # its workers, which would leave the rest of a reservation idle.
        torch.set_num_threads(threads)
        self.student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()
        self.teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval() if teacher_path else None
        self.pad_id = AutoTokenizer.from_pretrained(student_path).pad_token_id
        self.max_seq_len = max_seq_len

    def _target_logits(self, model, batch):
        import torch

        out = model(input_ids=torch.as_tensor(batch["input_ids"]), attention_mask=torch.as_tensor(batch["attention_mask"]))
        pos = torch.as_tensor(batch["pred_pos"])
        return out.logits[pos[:, 0], pos[:, 1]]

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from raydistill.data.collate import collate
        from raydistill.distill.losses import cross_entropy, forward_kl

        batch = collate(rows, self.max_seq_len, self.pad_id)
        with torch.no_grad():
            s_logits = self._target_logits(self.student, batch)
            targets = torch.as_tensor(batch["targets"])
            ids = torch.as_tensor(batch["topk_ids"])
            lps = torch.as_tensor(batch["topk_logprobs"])
            per_tok = {
                "student_nll": cross_entropy(s_logits, targets),
                "kl": forward_kl(s_logits, ids, lps),
                "top1_agree": (s_logits.argmax(-1) == ids[:, 0]).float(),
            }
            if self.teacher is not None:
                per_tok["teacher_nll"] = cross_entropy(self._target_logits(self.teacher, batch), targets)
        # Per-row sums: map each target token back to its row.
        row_of = torch.as_tensor(batch["pred_pos"][:, 0])
        n_rows = len(rows["input_ids"])
        out = {"tokens": np.bincount(batch["pred_pos"][:, 0], minlength=n_rows).astype(np.int64)}
        for name, values in per_tok.items():
            out[name] = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, row_of, values.double()).numpy()
        for name in ("id", *GROUP_COLUMNS):
            if name in rows:
                out[name] = np.asarray(rows[name])
        return out


def sum_scores(batches: Iterable[Mapping[str, np.ndarray]]) -> tuple[dict[str, float], int]:
    """Per-row score batches (``PairScorer``'s output) -> each score column summed over all rows, and the row count.

    Only the columns the batches have are summed: a student-only scorer has no ``teacher_nll``.
    """
    totals: dict[str, float] = {}
    n_rows = 0
    for batch in batches:
        n_rows += len(batch["tokens"])
        for c in SCORE_COLUMNS:
            if c in batch:
                totals[c] = totals.get(c, 0.0) + float(np.asarray(batch[c]).sum())
    return totals, n_rows


def split_by(batches: Iterable[Mapping[str, np.ndarray]], column: str) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per-row batches -> per value of ``column``, the sub-batches of the rows that have it (every column kept)."""
    parts: dict[str, list[dict[str, np.ndarray]]] = {}
    for batch in batches:
        keys = np.asarray(batch[column]).astype(str)
        for key in np.unique(keys):
            mask = keys == key
            parts.setdefault(str(key), []).append({c: np.asarray(v)[mask] for c, v in batch.items()})
    return parts


def summarize_groups(batches: Iterable[Mapping[str, np.ndarray]], by: str = "domain", label: str = "teacher") -> dict[str, dict]:
    """Per-row score batches -> per value of ``by`` (sorted): the ``label`` of its rows (the domain's teacher), row and
    token counts, and the token-weighted means, as ``summarize`` computes them for the whole set.

    ``teacher_nll`` is the NLL under the one teacher model the scorer holds (the first teacher), not the domain's
    own teacher; ``kl_to_teacher`` is to the stored signals, which are the domain's own teacher's.
    """
    out: dict[str, dict] = {}
    for key, parts in sorted(split_by(batches, by).items()):
        totals, n_rows = sum_scores(parts)
        whole = summarize(totals, n_rows)
        # One teacher per domain is the routing's promise; should a domain ever have rows from several, name them all.
        names = sorted({str(v) for p in parts for v in np.asarray(p[label])}) if all(label in p for p in parts) else []
        out[key] = {"teacher": "+".join(names) or None, "eval_sequences": n_rows, "eval_tokens": whole["eval_tokens"],
                    "kl_to_teacher": whole["kl_to_teacher"], "top1_agreement": whole["top1_agreement"],
                    "student_nll": whole["student"]["nll"], "teacher_nll": whole["teacher"]["nll"]}
    return out


def mean_kl(totals: Mapping[str, float]) -> float:
    """Summed ``kl`` over summed ``tokens``: nats per target token (0 for no tokens, as ``summarize``)."""
    return totals["kl"] / max(totals["tokens"], 1)


def summarize(totals: dict[str, float], n_rows: int) -> dict:
    n = max(totals["tokens"], 1)
    s_nll, t_nll = totals["student_nll"] / n, totals["teacher_nll"] / n
    return {
        "eval_sequences": n_rows,
        "eval_tokens": int(totals["tokens"]),
        "student": {"nll": s_nll, "perplexity": math.exp(min(s_nll, 700))},
        "teacher": {"nll": t_nll, "perplexity": math.exp(min(t_nll, 700))},
        "kl_to_teacher": totals["kl"] / n,
        "top1_agreement": totals["top1_agree"] / n,
        # exp(nll_s - nll_t), capped like the perplexities: the student's perplexity over the teacher's.
        "ppl_ratio": math.exp(min(s_nll - t_nll, 700)),
    }


def run_eval_stage(
    eval_spec: EvalSpec,
    max_seq_len: int,
    student_path: str,
    teacher_path: str,
    signals_dir: str | Path,
    run: RunDir,
    engine_args: dict,
    engine_env: dict[str, str],
) -> dict:
    """Score, measure and report; writes ``run.eval``: report.json, report.md and PNG plots.

    ``engine_args`` and ``engine_env`` are the vLLM settings and environment both models generate
    with (the teacher's: ``TeacherSpec.engine_args`` and ``cpu_engine_env()``).
    """
    from raydistill.data.signals import load_signals, read_signal_meta
    from raydistill.eval.report import model_size

    meta = read_signal_meta(signals_dir)
    routing = meta.get("routing")  # None for one teacher: everything below is as it always was
    # Rows with a domain (data.domain_field; with domain routing also their teacher): carried through the scorer, to sum per domain.
    import pyarrow.parquet as pq

    from raydistill.data.signals import shard_files

    stored = pq.ParquetDataset(shard_files(signals_dir)).schema.names
    labels = tuple(c for c in GROUP_COLUMNS if c in stored)
    batches = score_rows(eval_spec, max_seq_len, student_path, teacher_path, signals_dir, labels)
    totals, n_rows = sum_scores(batches)
    report = summarize(totals, n_rows)
    # With several teachers, ``teacher_path`` (the teacher model teacher_nll uses) is the first teacher.
    if "domain" in labels:
        report["by_domain"] = summarize_groups(batches)
    if routing == "ensemble":
        report["kl_by_teacher"] = kl_by_teacher(eval_spec, max_seq_len, student_path, signals_dir, [t["name"] for t in meta["teachers"]])
    report["student_dir"], report["teacher_dir"] = student_path, teacher_path
    report["student"].update(model_size(student_path))
    report["teacher"].update(model_size(teacher_path))

    table = load_signals(signals_dir, columns=["prompt", "response", "split", "input_ids", "target_start"])
    table = table.filter(pc.equal(table["split"], "eval"))
    prompts = table["prompt"].to_pylist()
    from raydistill.eval.report import prompt_repeat_figures

    report.update(prompt_repeat_figures(prompts, table["response"].to_pylist()))
    prompt_ids = [ids[: max(start, 1)] for ids, start in zip(table["input_ids"].to_pylist()[: eval_spec.own_samples], table["target_start"].to_pylist())]
    if eval_spec.measure_speed or eval_spec.side_by_side or eval_spec.own_samples:
        figures = generation_figures(eval_spec, student_path, teacher_path, prompts, prompt_ids, engine_args, engine_env)
        for m in ("student", "teacher"):
            report[m].update(figures.pop(m))
        report.update(figures)
        if report.get("side_by_side"):
            from raydistill.eval.report import repetition_figures

            rep = repetition_figures(report["side_by_side"])
            report["student"]["distinct4"], report["teacher"]["distinct4"] = rep["student_distinct4"], rep["teacher_distinct4"]
            report["distinct4_ratio"] = rep["distinct4_ratio"]
    eval_dir = write_report(report, run)
    print(
        f"[eval] {n_rows} held-out sequences: student NLL {report['student']['nll']:.3f}, "
        f"teacher NLL {report['teacher']['nll']:.3f}, KL {report['kl_to_teacher']:.3f}, "
        f"top-1 agreement {report['top1_agreement']:.1%}",
        flush=True,
    )
    for domain, g in report.get("by_domain", {}).items():
        print(f"[eval] domain {domain}" + (f" (teacher {g['teacher']})" if g["teacher"] else "") + f": {g['eval_sequences']} sequences, KL {g['kl_to_teacher']:.3f}, "
              f"top-1 agreement {g['top1_agreement']:.1%}, student NLL {g['student_nll']:.3f}", flush=True)
    for name, kl in report.get("kl_by_teacher", {}).items():
        print(f"[eval] KL to teacher {name}: {kl:.3f} (to the mixture: {report['kl_to_teacher']:.3f})", flush=True)
    if (own := report.get("own_samples")) and own["reverse_kl"] is not None:
        print(f"[eval] on the student's own samples ({own['tokens']} tokens): reverse KL to the teacher {own['reverse_kl']:.3f}, "
              f"teacher NLL {own['teacher_nll']:.3f}", flush=True)
    return {"report": str(eval_dir / "report.json"), **{k: report[k] for k in ("kl_to_teacher", "top1_agreement", "ppl_ratio")},
            **({"distinct4_ratio": report["distinct4_ratio"]} if report.get("distinct4_ratio") is not None else {}),
            **({"own_samples": report["own_samples"]} if "own_samples" in report else {}),
            **({"engine_dtype": report["engine_dtype"]} if "engine_dtype" in report else {}),
            **{k: report[k] for k in ("by_domain", "kl_by_teacher") if k in report}}


def score_rows(eval_spec: EvalSpec, max_seq_len: int, student_path: str, teacher_path: str | None, signals_dir: str | Path,
               extra_columns: tuple[str, ...] = (), split: str = "eval", ids: set[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Per-row figures on the held-out signals (a Ray Data actor stage), as batches; ``extra_columns`` of the
    signals are read and passed through. No ``teacher_path``: the student alone, against the stored signals.

    The batches are kept (a few numbers per row) so that the driver can sum them overall and per group.
    """
    import ray.data

    from raydistill.data.signals import read_signals

    rows = read_signals(signals_dir, split=split, extra_columns=extra_columns)
    if ids is not None:  # the adaptive loop's held-out slice
        wanted = frozenset(ids)
        rows = rows.filter(lambda r: r["id"] in wanted)
    scores = rows.map_batches(
        PairScorer,
        fn_constructor_kwargs={"student_path": student_path, "teacher_path": teacher_path, "max_seq_len": max_seq_len, "threads": eval_spec.num_cpus},
        batch_size=eval_spec.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=eval_spec.num_cpus,
    )
    batches = list(scores.iter_batches(batch_format="numpy"))
    if not sum(len(b["tokens"]) for b in batches):
        raise ValueError(f"no {split} rows in {signals_dir}" + ("; raise data.eval_fraction or add prompts" if split == "eval" else ""))
    return batches


def kl_by_teacher(eval_spec: EvalSpec, max_seq_len: int, student_path: str, signals_dir: str | Path, names: list[str]) -> dict[str, float]:
    """Ensemble routing: the student's KL (nats/token) to each teacher's own signals, ``signals_dir/teachers/<name>``.

    Each is scored by the student alone: the stored top-k is all the KL needs, so no teacher model is loaded.
    """
    return {name: mean_kl(sum_scores(score_rows(eval_spec, max_seq_len, student_path, None, Path(signals_dir) / "teachers" / name))[0])
            for name in names}


def generation_figures(eval_spec: EvalSpec, student_path: str, teacher_path: str, prompts: list[str], prompt_ids: list[list[int]],
                       engine_args: dict, engine_env: dict[str, str]) -> dict:
    """The report's vLLM part: both models' tokens/s on the same engine settings, side-by-side answers, engine dtypes,
    and the teacher-scored quality of the student's own samples on ``prompt_ids``."""
    from raydistill.eval.report import generation_runs

    own = {"prompt_ids": prompt_ids, "max_tokens": eval_spec.own_sample_tokens} if eval_spec.own_samples and prompt_ids else None
    runs = generation_runs(
        {"student": student_path, "teacher": teacher_path}, engine_args, engine_env,
        prompts[: eval_spec.speed_prompts], min(eval_spec.side_by_side, len(prompts)), eval_spec.speed_tokens, own,
    )
    out: dict = {"student": {}, "teacher": {}}
    if eval_spec.measure_speed:
        for m in ("student", "teacher"):
            out[m] = dict(tokens_per_s=runs[m]["tokens_per_s"], speed_tokens=runs[m]["tokens"], speed_seconds=runs[m]["seconds"])
        out["student_over_teacher_speedup"] = runs["student"]["tokens_per_s"] / runs["teacher"]["tokens_per_s"]
    out["engine_dtype"] = {m: runs[m]["engine_dtype"] for m in ("student", "teacher")}
    if "own_samples" in runs:
        out["own_samples"], out["own_sample_rows"] = runs["own_samples"], runs["own_sample_rows"]
    out["side_by_side"] = [{"prompt": p, "student": s, "teacher": t} for p, s, t in zip(prompts, runs["student"]["answers"], runs["teacher"]["answers"])]
    return out


def write_report(report: dict, run: RunDir) -> Path:
    """``run.eval``: report.json, report.md, the loss curve (from ``run.train``) and the comparison chart; returns it."""
    from raydistill.eval.report import comparison_chart, loss_curve, write_markdown

    eval_dir = run.eval
    eval_dir.mkdir(parents=True, exist_ok=True)
    if rows := report.pop("own_sample_rows", None):
        # The student's samples with both models' log-probs of each token: the own-sample figures, auditable.
        write_atomic(eval_dir / "own_samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    report["loss_curve"] = loss_curve(run.train / "metrics.jsonl", eval_dir / "loss_curve.png")
    comparison_chart(report, eval_dir / "comparison.png")
    write_atomic(eval_dir / "report.json", json.dumps(report, indent=2))
    write_markdown(report, eval_dir / "report.md")
    return eval_dir
