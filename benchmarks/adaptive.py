"""The adaptive data loop: ``uniform`` against the adaptive policies at the same budget, per domain.

Every variant runs the project's own loop (``raydistill.loop.rounds.run_loop``: Ray Train +
DeepSpeed rounds) over the same teacher signals (one teacher pass, so the same teacher tokens),
from the same student, for the same rounds and ``train.max_steps`` per round (so the same total
optimizer steps), and is measured the same way: the final student's held-out KL (teacher ||
student, nats/token) in each domain, on every held-out row (``loop.gap_rows_per_domain`` is
raised to cover them). Variants:

    uniform     each round draws each domain by its share of the corpus
    ddk         DDK's domain weights, moved toward the larger gap each round
    hard        uniform weights, half of each domain's rows replayed from its hardest
    ddk+hard    both

``worst_domain_kl_ratio`` = the best adaptive variant's worst-domain KL over uniform's (target
<= 0.9); ``mean_kl_ratio`` = that variant's mean domain KL over uniform's (target <= 1.0). Each
variant runs ``--seeds`` times (loop.seed and train.seed); the figures are the means over seeds.

    .venv/bin/python benchmarks/adaptive.py --json adaptive.json \\
        [--spec configs/tiny_loop.yaml] [--signals RUN/signals] [--rounds 3] [--steps 4] [--seeds 2] [--set KEY=VALUE ...]

The spec must set ``data.domain_field``. ``--signals`` reuses a finished teacher pass of that spec.
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

VARIANTS = {"uniform": ["uniform"], "ddk": ["ddk"], "hard": ["hard"], "ddk+hard": ["ddk", "hard"]}


def domain_figures(final_gaps: dict[str, dict]) -> dict:
    """Per-domain held-out KL of a final student -> the domains' KLs, the worst and the (row-unweighted) mean."""
    kl = {d: g["kl"] for d, g in sorted(final_gaps.items())}
    return {"kl_by_domain": kl, "worst_domain_kl": max(kl.values()), "mean_kl": sum(kl.values()) / len(kl)}


def mean_over_seeds(per_seed: list[dict]) -> dict:
    domains = per_seed[0]["kl_by_domain"]
    return {"kl_by_domain": {d: sum(r["kl_by_domain"][d] for r in per_seed) / len(per_seed) for d in domains},
            "worst_domain_kl": sum(r["worst_domain_kl"] for r in per_seed) / len(per_seed),
            "mean_kl": sum(r["mean_kl"] for r in per_seed) / len(per_seed), "seeds": per_seed}


def headline(rows: dict[str, dict]) -> dict:
    """The best adaptive variant (lowest worst-domain KL) against uniform."""
    adaptive = [n for n in rows if n != "uniform"]
    best = min(adaptive, key=lambda n: rows[n]["worst_domain_kl"])
    return {"best_adaptive": best, "worst_domain_kl_ratio": rows[best]["worst_domain_kl"] / rows["uniform"]["worst_domain_kl"],
            "mean_kl_ratio": rows[best]["mean_kl"] / rows["uniform"]["mean_kl"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="write the figures here")
    parser.add_argument("--spec", default=str(ROOT / "configs/tiny_loop.yaml"))
    parser.add_argument("--signals", help="a finished teacher pass of the spec to reuse (RUN/signals)")
    parser.add_argument("--out", default="runs/adaptive", help="working directory (one run dir per variant and seed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per round (default: the spec's train.max_steps)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--only", help="comma-separated subset of variants (uniform is always run)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override, as `raydistill run --set` (repeatable)")
    args = parser.parse_args()

    from raydistill.distill.train import run_train_stage
    from raydistill.jobs.pipeline import init_ray
    from raydistill.jobs.rundir import RunDir
    from raydistill.loop.rounds import run_loop
    from raydistill.models import resolve_model
    from raydistill.spec import LoopSpec, TrainSpec, load_spec
    from raydistill.teacher.stage import run_teacher_stage

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = load_spec(args.spec, [*args.set, f"runtime.run_dir={out / 'teacher'}"])
    if base.data.domain_field is None:
        raise SystemExit(f"{args.spec}: set data.domain_field (the benchmark compares domains)")
    init_ray(base.runtime)
    teacher_path = resolve_model(base.teacher.model)
    student_path = resolve_model(base.student.model) if base.student.model else None
    signals = Path(args.signals).resolve() if args.signals else out / "teacher" / "signals"
    if not args.signals:
        run_teacher_stage(base.data, base.teacher, base.teacher_pass, teacher_path, str(signals))

    names = ["uniform"] + [n for n in VARIANTS if n != "uniform" and (not args.only or n in args.only.split(","))]
    rows: dict[str, dict] = {}
    for name in names:
        per_seed = []
        for seed in range(args.seeds):
            loop = {"rounds": args.rounds, "policy": VARIANTS[name], "seed": seed, "gap_rows_per_domain": 10**6}
            if base.loop is not None:
                loop = {**base.loop.model_dump(), **loop}
            train = {**base.train.model_dump(), "seed": seed, **({"max_steps": args.steps} if args.steps else {})}
            spec = base.model_copy(update={"loop": LoopSpec(**loop), "train": TrainSpec(**train)})
            run = RunDir.of(out / f"{name}-seed{seed}")
            if run.root.exists():
                shutil.rmtree(run.root)
            run.root.mkdir(parents=True)
            os.symlink(signals, run.signals)  # the same teacher tokens for every variant

            def train_round(rr, student, first, spec=spec):
                return run_train_stage(spec.train, spec.distill, student_path if first else student, signals if first else rr.signals, rr,
                                       student=spec.student if first else None, teacher_path=teacher_path, teacher=spec.teacher,
                                       teacher_pass=spec.teacher_pass)

            t0 = time.time()
            history = run_loop(spec, run, train_round)["rounds"]
            figures = domain_figures(history[-1]["gap_detail"])
            figures.update(seed=seed, seconds=round(time.time() - t0, 1), weights=[h.get("weights") for h in history[:-1]])
            print(f"[adaptive] {name} seed {seed}: " + ", ".join(f"{d} {v:.4f}" for d, v in figures["kl_by_domain"].items())
                  + f"; worst {figures['worst_domain_kl']:.4f}, mean {figures['mean_kl']:.4f}", flush=True)
            per_seed.append(figures)
        rows[name] = mean_over_seeds(per_seed)

    import ray

    figures = {"spec": args.spec, "overrides": args.set, "rounds": args.rounds, "steps_per_round": args.steps or base.train.max_steps, "seeds": args.seeds,
               "variants": rows, **headline(rows),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, ray {ray.__version__}"}
    Path(args.json).write_text(json.dumps(figures, indent=2))
    domains = list(rows["uniform"]["kl_by_domain"])
    print("\n| variant | " + " | ".join(f"KL {d}" for d in domains) + " | worst | mean |")
    print("|---|" + "---|" * (len(domains) + 2))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['kl_by_domain'][d]:.4f}" for d in domains) + f" | {r['worst_domain_kl']:.4f} | {r['mean_kl']:.4f} |")
    print(json.dumps({k: figures[k] for k in ("best_adaptive", "worst_domain_kl_ratio", "mean_kl_ratio")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
