"""The ``raydistill`` command line: validate, run, serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raydistill.jobs.manifest import STAGES
from raydistill.spec import ServeSpec, SpecError, apply_overrides, format_validation_error, load_spec


def _print_errors(err: SpecError) -> int:
    print(f"error: the job spec has {len(err.errors)} problem(s):", file=sys.stderr)
    for line in err.errors:
        print(f"  {line}", file=sys.stderr)
    return 2


def cmd_validate(args) -> int:
    spec = load_spec(args.spec, args.set)
    print(f"{args.spec}: valid (run_dir {spec.runtime.run_dir})")
    return 0


def _parse_stages(text: str | None) -> list[str]:
    if not text:
        return list(STAGES)
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SpecError([f"--stages: {', '.join(unknown)} not one of {', '.join(STAGES)}"])
    return stages


def cmd_run(args) -> int:
    from raydistill.jobs.pipeline import run_pipeline

    spec = load_spec(args.spec, args.set)
    stages = _parse_stages(args.stages)
    manifest = run_pipeline(spec, stages)
    run_dir = Path(spec.runtime.run_dir)
    print("\n==> run summary")
    for name, entry in manifest["stages"].items():
        print(f"  {name:12s} {entry['status']:10s} {entry.get('seconds', '')}s")
    student = run_dir / "student"
    if student.exists():
        print(f"\nThe student is in {student} (a plain Hugging Face directory).")
        print(f"Serve it with:  raydistill serve {run_dir}")
    if (run_dir / "eval" / "report.json").exists():
        print(f"Evaluation report: {run_dir / 'eval' / 'report.json'}")
    return 0


def _serve_spec(overrides: list[str]) -> ServeSpec:
    from pydantic import ValidationError

    bad = [o for o in overrides if not o.startswith("serve.")]
    if bad:
        raise SpecError([f"--set {o}: raydistill serve only accepts serve.* keys" for o in bad])
    raw = apply_overrides({}, [o.removeprefix("serve.") for o in overrides])
    try:
        return ServeSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(["serve." + line for line in format_validation_error(err)]) from None


def cmd_serve(args) -> int:
    import signal
    import time

    import ray

    from raydistill.serving.app import start_app, student_dir_of

    serve = _serve_spec(args.set)
    model_path = student_dir_of(args.path)
    model_id = serve.model_id or Path(args.path.rstrip("/")).name
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    print(f"Starting the OpenAI-compatible app for {model_path} ...", flush=True)
    base = start_app(model_path, model_id, serve)
    print(f"\nServing model '{model_id}' at {base}/v1")
    print(f"  curl {base}/v1/completions -H 'Content-Type: application/json' \\")
    print(f"       -d '{{\"model\": \"{model_id}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
    print("Press Ctrl-C to stop.", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydistill", description="Distill LLMs on Ray: teacher pass, KD training, eval, serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_set(p):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field, e.g. --set train.workers=1")
        return p

    p = with_set(sub.add_parser("validate", help="check a job spec and list every problem"))
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    p = with_set(sub.add_parser("run", help="run the job on a local Ray (or runtime.ray_address)"))
    p.add_argument("spec")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}")
    p.set_defaults(func=cmd_run)

    p = with_set(sub.add_parser("serve", help="serve a student (or a run's student) over an OpenAI-compatible API"))
    p.add_argument("path", help="a student directory or a run directory")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs for the local Ray")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as err:
        return _print_errors(err)


if __name__ == "__main__":
    sys.exit(main())
