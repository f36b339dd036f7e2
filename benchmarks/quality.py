"""Distillation quality: the KD losses against no training and against SFT, at one budget.

Every variant starts from the same pruned initialization (``student`` section of the spec),
trains on the same teacher signals with the same steps, batch and seed (so the same tokens in
the same order), through the project's own trainer (Ray Train + DeepSpeed), and is scored on the
same held-out split by the project's eval stage:

    (a) init     no training: the pruned initialization
    (b) sft      CE on the teacher's generations only (sequence-level KD): ce_weight = 1
    (c) fkl      forward KL on the top-k + tail
    (d) rkl      reverse KL
    (e) jsd      JSD (distill.jsd_beta)
    (f) fkl+ce   forward KL mixed with CE (--mix-ce)
    (g) op-rkl   on-policy (GKD) reverse KL, every micro-batch a rollout (lmbda 1)
    (h) op-mix   on-policy reverse KL, half rollouts, half offline signals (lmbda 0.5)
    (i) op-srkl  on-policy sampled reverse KL (the per-token estimator at the sampled token), lmbda 1
    teacher      the teacher scored against its own signals: the ceiling

With ``--auto-layers`` (a spec whose student is pruned from the teacher), (a) and (c) run once
more as ``init@auto`` and ``fkl@auto``: the same number of teacher layers, chosen by
``student.layers: auto`` (``--layer-scoring``: block influence by default, or drop_one, on the
signals' training rows) instead of the spec's hand-picked list.

Figures per variant: held-out KL to the teacher on the teacher's text (sparse, with tail),
perplexity on the teacher's responses, top-1 agreement, and on the student's own samples of
the held-out prompts the reverse KL to the teacher and the teacher's NLL (eval.own_samples).
``best_kd_gap_closed`` = (KL_init - KL_best) / (KL_init - KL_teacher) over (c)-(f);
``best_kd_beats_sft`` = KL_best < KL_sft; ``onpolicy_over_offline_sample_rkl`` = the best
on-policy variant's own-sample reverse KL over the best offline variant's (target <= 0.9).
Trained variants run ``--seeds`` times (train.seed and distill.on_policy.seed); the table shows
the mean and each seed's value.

    .venv/bin/python benchmarks/quality.py --json quality.json \\
        [--spec configs/quickstart.yaml] [--signals runs/quickstart/signals] [--steps 40] [--set KEY=VALUE ...]

``--signals`` reuses a finished teacher pass (for example the quickstart's); without it the
teacher stage runs first into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KD_VARIANTS = ("fkl", "rkl", "jsd", "fkl+ce")
OFFLINE_VARIANTS = ("sft", *KD_VARIANTS)
ON_POLICY_VARIANTS = ("op-rkl", "op-mix", "op-srkl")
SCORES = ("kl_to_teacher", "perplexity", "nll", "top1_agreement", "sample_reverse_kl", "sample_teacher_nll")


def variants(mix_ce: float) -> dict[str, dict | None]:
    """Variant name -> distill-section overrides (None: not trained)."""
    return {
        "init": None,
        "sft": {"loss": "forward_kl", "ce_weight": 1.0},
        "fkl": {"loss": "forward_kl", "ce_weight": 0.0},
        "rkl": {"loss": "reverse_kl", "ce_weight": 0.0},
        "jsd": {"loss": "jsd", "ce_weight": 0.0},
        "fkl+ce": {"loss": "forward_kl", "ce_weight": mix_ce},
        "op-rkl": {"mode": "on_policy", "loss": "reverse_kl", "ce_weight": 0.0, "on_policy": {"lmbda": 1.0}},
        "op-mix": {"mode": "on_policy", "loss": "reverse_kl", "ce_weight": 0.0, "on_policy": {"lmbda": 0.5}},
        "op-srkl": {"mode": "on_policy", "loss": "sampled_reverse_kl", "ce_weight": 0.0, "on_policy": {"lmbda": 1.0}},
    }


def _scores(report_file: Path) -> dict:
    report = json.loads(report_file.read_text())
    own = report.get("own_samples") or {}
    return {
        "kl_to_teacher": report["kl_to_teacher"],
        "perplexity": report["student"]["perplexity"],
        "nll": report["student"]["nll"],
        "top1_agreement": report["top1_agreement"],
        "eval_tokens": report["eval_tokens"],
        "sample_reverse_kl": own.get("reverse_kl"),
        "sample_teacher_nll": own.get("teacher_nll"),
        "sample_tokens": own.get("tokens"),
    }


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """Each score's mean over the seeds, plus the per-seed values under ``seeds``."""
    out = dict(per_seed[0])
    for key in SCORES:
        values = [r[key] for r in per_seed if r.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    out["seeds"] = [{k: r.get(k) for k in (*SCORES, "train_seconds", "seed", "on_policy_phases") if k in r} for r in per_seed]
    return out


def onpolicy_figures(rows: dict[str, dict]) -> dict:
    """Best on-policy vs best offline variant on the reverse KL of the student's own samples."""
    rkl = {n: r["sample_reverse_kl"] for n, r in rows.items() if r.get("sample_reverse_kl") is not None}
    on = [n for n in ON_POLICY_VARIANTS if n in rkl]
    off = [n for n in OFFLINE_VARIANTS if n in rkl]
    if not on or not off:
        return {}
    best_on, best_off = min(on, key=rkl.get), min(off, key=rkl.get)
    return {"best_on_policy": best_on, "best_offline": best_off, "onpolicy_over_offline_sample_rkl": rkl[best_on] / rkl[best_off]}


def gap_figures(rows: dict[str, dict]) -> dict:
    """The headline figures from per-variant rows holding ``kl_to_teacher``."""
    kl = {name: row["kl_to_teacher"] for name, row in rows.items()}
    best = min(KD_VARIANTS, key=lambda v: kl[v])
    gap = kl["init"] - kl["teacher"]
    return {
        "best_kd": best,
        "best_kd_gap_closed": (kl["init"] - kl[best]) / gap if gap > 0 else float("nan"),
        "best_kd_beats_sft": bool(kl[best] < kl["sft"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the figures here")
    parser.add_argument("--spec", default=str(ROOT / "configs/quickstart.yaml"))
    parser.add_argument("--signals", help="a finished teacher pass to reuse (RUN/signals)")
    parser.add_argument("--out", default="runs/quality", help="working directory (one run dir per variant)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: the spec's train.max_steps)")
    parser.add_argument("--mix-ce", type=float, default=0.5, help="ce_weight of the fkl+ce variant")
    parser.add_argument("--only", help="comma-separated subset of variants (the headline figures need all)")
    parser.add_argument("--seeds", type=int, default=2, help="runs per trained variant, seeds 0..N-1")
    parser.add_argument("--own-samples", type=int, default=16, help="held-out prompts the student samples from in the eval (eval.own_samples)")
    parser.add_argument("--auto-layers", action="store_true", help="also init and fkl with student.layers auto at the spec's layer count")
    parser.add_argument("--layer-scoring", choices=["block_influence", "drop_one"], default="block_influence",
                        help="--auto-layers: student.layer_scoring of the auto variants")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a spec override for every variant, as `raydistill run --set` (repeatable)")
    args = parser.parse_args()

    from raydistill.distill.init import PRUNE_INFO_FILE, kept_layers, prepare_student, text_config
    from raydistill.distill.train import calibration_sequences, run_train_stage
    from raydistill.eval.stage import run_eval_stage
    from raydistill.jobs.pipeline import init_ray
    from raydistill.jobs.rundir import RunDir
    from raydistill.models import resolve_model
    from raydistill.spec import load_spec

    # The own-sample reverse KL is a headline figure, so the eval samples even where the spec turns it off.
    overrides = [*args.overrides, "eval.measure_speed=false", "eval.side_by_side=0", f"eval.own_samples={args.own_samples}", f"runtime.run_dir={args.out}"]
    if args.steps:
        overrides.append(f"train.max_steps={args.steps}")
    spec = load_spec(args.spec, overrides)
    out = Path(spec.runtime.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = resolve_model(spec.teacher.model)
    student_model = resolve_model(spec.student.model) if spec.student.model else None  # the start of init 'pretrained'
    init_ray(spec.runtime)

    if args.signals:
        signals = str(Path(args.signals).resolve())
    else:
        from raydistill.teacher.stage import run_teacher_stage

        signals = str(out / "signals")
        run_teacher_stage(spec.data, spec.teacher, spec.teacher_pass, teacher, signals)

    chosen = variants(args.mix_ce)
    students = dict.fromkeys(chosen, spec.student)
    if args.auto_layers:
        if spec.student.init != "prune_from_teacher" or spec.student.layers == "auto":
            parser.error("--auto-layers compares against a hand-picked pruning: the spec's student must list layers or every_nth")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(teacher)
        n_teacher = text_config(config).num_hidden_layers
        n_kept = len(kept_layers(n_teacher, spec.student.layers, spec.student.every_nth))
        auto = spec.student.model_copy(update={"layers": "auto", "num_layers": n_kept, "every_nth": None, "layer_scoring": args.layer_scoring})
        for base in ("init", "fkl"):
            chosen[f"{base}@auto"], students[f"{base}@auto"] = chosen[base], auto
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows: dict[str, dict] = {}
    for name, distill_overrides in chosen.items():
        student_spec = students[name]
        per_seed = []
        for seed in range(1 if distill_overrides is None else args.seeds):
            run_dir = out / name.replace("+", "_").replace("@", "_") / f"seed{seed}"
            t0 = time.perf_counter()
            if distill_overrides is None:
                student_dir = prepare_student(student_spec, teacher, student_model, RunDir(run_dir), lambda n: calibration_sequences(signals, n))
            else:
                for stale in ("checkpoints", "student", "train", "signals"):  # a fresh run, never a resume of an old one
                    shutil.rmtree(run_dir / stale, ignore_errors=True)
                distill = spec.distill.model_validate({**spec.distill.model_dump(), **distill_overrides,
                                                       "on_policy": {**spec.distill.on_policy.model_dump(), **distill_overrides.get("on_policy", {}), "seed": seed}})
                print(f"==> [{name} seed {seed}] training: {distill_overrides}", flush=True)
                trained = run_train_stage(spec.train.model_copy(update={"seed": seed}), distill, student_model, signals, RunDir(run_dir),
                                          student=student_spec, teacher_path=teacher, teacher=spec.teacher, teacher_pass=spec.teacher_pass)
                student_dir = trained["student_dir"]
            train_s = time.perf_counter() - t0
            run_eval_stage(spec.eval, spec.train.max_seq_len, student_dir, teacher, signals, RunDir(run_dir), spec.teacher.engine_args, spec.teacher.cpu_engine_env())
            phases = {k: trained["on_policy"][k] for k in ("rollout_tokens_per_s", "score_tokens_per_s", "sync_s_per_sync", "phase_seconds")} \
                if distill_overrides and "on_policy" in trained else {}
            prune_info = run_dir / "student_init" / PRUNE_INFO_FILE
            kept = {"kept_layers": json.loads(prune_info.read_text())["kept_layers"]} if prune_info.exists() else {}
            per_seed.append({**(distill_overrides or {}), **_scores(run_dir / "eval" / "report.json"), "train_seconds": round(train_s, 1),
                             "seed": seed, **kept, **({"on_policy_phases": phases} if phases else {})})
        rows[name] = mean_over_seeds(per_seed)
        print(f"==> [{name}] {rows[name]}", flush=True)

    # The ceiling: the teacher (transformers) scored against its own stored signals (vLLM).
    run_eval_stage(spec.eval, spec.train.max_seq_len, teacher, teacher, signals, RunDir(out / "teacher"), spec.teacher.engine_args, spec.teacher.cpu_engine_env())
    rows["teacher"] = _scores(out / "teacher" / "eval" / "report.json")

    import ray
    import torch

    figures = {
        "spec": args.spec, "signals": signals, "steps": spec.train.max_steps, "workers": spec.train.workers,
        "micro_batch_size": spec.train.micro_batch_size, "grad_accum": spec.train.grad_accum, "lr": spec.train.lr,
        "variants": rows,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, ray {ray.__version__}, torch {torch.__version__}",
    }
    if all(v in rows for v in ("init", "sft", *KD_VARIANTS)):
        figures.update(gap_figures(rows))
    figures.update(onpolicy_figures(rows))
    Path(args.json).write_text(json.dumps(figures, indent=2))

    def fmt(x, spec_):
        return format(x, spec_) if x is not None else "-"

    for name, row in rows.items():
        if "kept_layers" in row:
            print(f"{name}: the teacher's layers {row['kept_layers']}")
    print(f"\n{'variant':<9} {'KL to teacher':>14} {'perplexity':>11} {'top-1 agree':>12} {'own-sample rKL':>15} {'per seed':>20}")
    for name, row in rows.items():
        seeds = " / ".join(fmt(s["sample_reverse_kl"], ".3f") for s in row.get("seeds", []))
        print(f"{name:<9} {row['kl_to_teacher']:>14.4f} {row['perplexity']:>11.2f} {row['top1_agreement']:>12.1%} "
              f"{fmt(row['sample_reverse_kl'], '.4f'):>15} {seeds:>20}")
    for name, row in rows.items():
        for s in row.get("seeds", []):
            if ph := s.get("on_policy_phases"):
                sync = "-" if ph["sync_s_per_sync"] is None else f"{ph['sync_s_per_sync']:.2f}"
                print(f"{name} seed {s['seed']}: rollout {fmt(ph['rollout_tokens_per_s'], '.0f')} tok/s, "
                      f"scoring {fmt(ph['score_tokens_per_s'], '.0f')} tok/s, "
                      f"sync {sync} s each; seconds per phase {ph['phase_seconds']}")
    headline = [k for k in ("best_kd", "best_kd_gap_closed", "best_kd_beats_sft", "best_on_policy", "best_offline",
                            "onpolicy_over_offline_sample_rkl") if k in figures]
    print(json.dumps({k: figures[k] for k in headline}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
