"""The ``raydistill`` command line: validate, run, serve, and submit · status · logs · stop · list on a cluster."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import yaml

from raydistill.jobs import submit as jobs
from raydistill.jobs.pipeline import RunDirBusy
from raydistill.jobs.stages import STAGE_NAMES as STAGES
from raydistill.jobs.tracking import TrackingError
from raydistill.spec import JobSpec, ServeSpec, SpecError, apply_overrides, format_validation_error, load_spec, spec_from_dict


def _print_errors(err: SpecError) -> int:
    print(f"error: the job spec has {len(err.errors)} problem(s):", file=sys.stderr)
    for line in err.errors:
        print(f"  {line}", file=sys.stderr)
    return 2


def cmd_validate(args) -> int:
    spec = load_spec(args.spec, args.set)
    if spec.teachers is not None:
        _validate_teachers(spec)
    print(f"{args.spec}: valid (run_dir {spec.runtime.run_dir})")
    return 0


def _validate_teachers(spec: JobSpec) -> None:
    """What the spec alone cannot show about several teachers: their tokenizers, and the corpus's domains."""
    from raydistill.models import resolve_model
    from raydistill.teacher.multi import corpus_domain_errors, student_tokenizer_errors

    paths = [resolve_model(t.model) for t in spec.teachers]
    student = resolve_model(spec.student.model) if spec.student.model else None
    errors = student_tokenizer_errors(spec.teachers, paths, student)
    if spec.teacher_pass.routing == "domain":
        errors += corpus_domain_errors(spec.data, spec.teachers)
    if errors:
        raise SpecError(errors)


def _parse_stages(text: str | None) -> list[str]:
    if not text:
        return list(STAGES)
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise SpecError([f"--stages: {', '.join(unknown)} not one of {', '.join(STAGES)}"])
    return stages


def _run_spec(args) -> JobSpec:
    """The spec for ``run``: a file, or YAML in an environment variable (how ``submit`` ships it to a cluster)."""
    if bool(args.spec) == bool(args.spec_from_env):
        raise SpecError(["run: give either a SPEC file or --spec-from-env NAME"])
    if args.spec:
        return load_spec(args.spec, args.set)
    text = os.environ.get(args.spec_from_env)
    if text is None:
        raise SpecError([f"--spec-from-env {args.spec_from_env}: the environment variable is not set"])
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SpecError([f"--spec-from-env {args.spec_from_env}: not valid YAML: {err}"]) from None
    return spec_from_dict(apply_overrides(raw, args.set) if isinstance(raw, dict) else raw)


def cmd_run(args) -> int:
    from raydistill.jobs.console import held_output
    from raydistill.jobs.pipeline import failed_stage, run_pipeline

    quiet = not (args.verbose or args.dry_run)
    with held_output(enabled=quiet) as held:  # until RUN/logs/driver.log is known
        spec = _run_spec(args)
        stages = _parse_stages(args.stages) if args.stages else None
        force = tuple(_parse_stages(args.force)) if args.force else ()
    try:
        manifest = run_pipeline(spec, stages, force=force, dry_run=args.dry_run,
                                console=None if args.dry_run else "verbose" if args.verbose else "quiet", preamble=held.text)
    except Exception as err:
        if args.verbose or not failed_stage(err):
            raise
        # The driver-side traceback is in RUN/logs/driver.log (the note says where); the error itself is shown whole.
        print("error: " + "".join(traceback.format_exception_only(type(err), err)).rstrip(), file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
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


def cmd_eval(args) -> int:
    """Re-score a finished run and rewrite RUN/eval/ (report.json, report.md, plots)."""
    from raydistill.jobs.pipeline import run_pipeline
    from raydistill.jobs.rundir import RunDir

    run = RunDir.of(Path(args.run_dir).resolve())
    if not run.spec.exists() or not (run.student / "config.json").exists():
        raise SpecError([f"{args.run_dir}: not a finished run directory (needs spec.yaml and student/)"])
    # The spec the run was made with; the pipeline's own eval stage, forced, so the manifest records it.
    spec = load_spec(run.spec, [*args.set, f"runtime.run_dir={run.root}", "eval.enabled=true"])
    manifest = run_pipeline(spec, ["eval"], force=("eval",))
    print(f"Report: {Path(manifest['stages']['eval']['outputs']['report']).with_suffix('.md')}")
    return 0


def _serve_spec(overrides: list[str], base: dict | None = None) -> ServeSpec:
    from pydantic import ValidationError

    bad = [o for o in overrides if not o.startswith("serve.")]
    if bad:
        raise SpecError([f"--set {o}: raydistill serve only accepts serve.* keys" for o in bad])
    raw = apply_overrides(dict(base or {}), [o.removeprefix("serve.") for o in overrides])
    try:
        return ServeSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(["serve." + line for line in format_validation_error(err)]) from None


def _explicit_model_id(overrides: list[str]) -> str | None:
    from raydistill.spec import parse_override

    ids = [parse_override(o)[1] for o in overrides if o.startswith("serve.model_id=")]
    return str(ids[-1]) if ids else None


def cmd_serve(args) -> int:
    if not args.address and (args.detach or args.status or args.stop):
        # The local head raydistill starts runs with token auth (serving/lifecycle.py). Ray reads
        # the mode when it is first imported, so it is set before anything here imports ray.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    if args.status or args.stop:
        if args.paths or args.teacher or args.detach:
            raise SpecError(["serve --status/--stop: give no PATH, --teacher or --detach"])
        from raydistill.serving import commands

        serve = _serve_spec(args.set)
        return commands.status(serve, args.address) if args.status else commands.stop(serve, args.address)
    if not args.paths:
        raise SpecError(["serve: give at least one PATH (a run directory, a student directory or a job spec)"])
    from raydistill.serving.targets import base_serve_section, resolve_source, served_models

    sources = [resolve_source(p) for p in args.paths]
    serve = _serve_spec(args.set, base_serve_section(sources))
    models = served_models(sources, _explicit_model_id(args.set), args.teacher)
    from raydistill.serving.app import api_key_from_env

    from raydistill.serving import commands

    key = api_key_from_env(serve)  # read before anything starts, so a missing key fails fast
    if args.detach:
        return commands.detached(models, serve, key, args.address, args.num_cpus)
    return commands.foreground(models, serve, key, args.address, args.num_cpus)


# --------------------------------------------------------------------------- cluster commands


def cmd_submit(args) -> int:
    submission = jobs.prepare_submission(args.spec, args.set, args.address)
    for note in submission.notes:
        print(f"note: {note}", file=sys.stderr)
    client, token = jobs.connect(args.address)
    with jobs.explain_cluster_errors(args.address, token):
        job_id = jobs.submit(client, submission)
    print(job_id, flush=True)
    print(f"Submitted to {args.address}; run_dir {submission.spec.runtime.run_dir}", file=sys.stderr)
    if not args.follow:
        print(f"Follow it with:  raydistill logs {job_id} --follow --address {args.address}", file=sys.stderr)
        return 0
    return _follow(args.address, client, token, job_id)


def _follow(address: str, client, token, job_id: str) -> int:
    try:
        with jobs.explain_cluster_errors(address, token):
            status = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nStopped following. Job {job_id} keeps running; stop it with: raydistill stop {job_id}", file=sys.stderr)
        return 130
    print(f"\n==> job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    client, token = jobs.connect(args.address)
    with jobs.explain_cluster_errors(args.address, token):
        info = client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status.value}")
    if info.message:
        print(f"  {info.message}")
    return 0


def cmd_logs(args) -> int:
    client, token = jobs.connect(args.address)
    if args.follow:
        return _follow(args.address, client, token, args.job_id)
    with jobs.explain_cluster_errors(args.address, token):
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def cmd_stop(args) -> int:
    client, token = jobs.connect(args.address)
    with jobs.explain_cluster_errors(args.address, token):
        if not client.stop_job(args.job_id):
            print(f"{args.job_id}: not running ({client.get_job_status(args.job_id).value})")
            return 0
        # Ray stops the job asynchronously (SIGTERM, then SIGKILL); wait so the user sees the outcome.
        status = jobs.wait_for_terminal(client, args.job_id, timeout_s=args.timeout)
    print(f"{args.job_id}: {status}")
    return 0 if status in jobs.TERMINAL_STATUSES else 1


def cmd_list(args) -> int:
    client, token = jobs.connect(args.address)
    with jobs.explain_cluster_errors(args.address, token):
        print(jobs.format_job_table(client.list_jobs()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydistill", description="Distill LLMs on Ray: teacher pass, KD training, eval, serving.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_set(p):
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field, e.g. --set train.workers=1")
        # Only the command line consents to remote code: a spec (or a run's spec.yaml) asking for it is refused without this.
        p.add_argument("--trust-remote-code", action="store_true",
                       help="allow engine_args trust_remote_code: true (runs Python code shipped with a model); a spec alone cannot")
        return p

    p = with_set(sub.add_parser("validate", help="check a job spec and list every problem"))
    p.add_argument("spec")
    p.set_defaults(func=cmd_validate)

    p = with_set(sub.add_parser("run", help="run the job on a local Ray (or runtime.ray_address)"))
    p.add_argument("spec", nargs="?", help="the job spec (YAML)")
    p.add_argument("--spec-from-env", metavar="NAME", help="read the spec's YAML from this environment variable instead (used by submit)")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)}; others whose inputs changed are marked stale")
    p.add_argument("--force", help="comma-separated stages to run again even though their inputs did not change (and what reads them)")
    p.add_argument("--dry-run", action="store_true", help="print which stages would run and why; change nothing")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the vLLM engines', Ray's and Ray Data's logs on the console (by default they go to RUN/logs/)")
    p.set_defaults(func=cmd_run)

    p = with_set(sub.add_parser("eval", help="re-score a finished run and regenerate RUN/eval/"))
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_eval)

    p = with_set(sub.add_parser("serve", help="serve students (and their teacher) over one OpenAI-compatible API"))
    p.add_argument("paths", nargs="*", metavar="PATH", help="run directories, student (model) directories or job specs")
    p.add_argument("--teacher", nargs="?", const="auto", metavar="MODEL",
                   help="also serve a teacher, as model 'teacher': the first run's own teacher, or MODEL (a directory or tiny:teacher)")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs for a local Ray")
    p.add_argument("--address", default=None, help="Ray cluster to deploy on (host:port, ray://host:10001 or auto); default: a local Ray")
    p.add_argument("--detach", action="store_true", help="leave the app running after this command exits (a local head is started if no --address)")
    p.add_argument("--status", action="store_true", help="show the detached app (serve.app_name) and its replicas")
    p.add_argument("--stop", action="store_true", help="delete the detached app (and the local head raydistill started for it)")
    p.set_defaults(func=cmd_serve)

    def with_address(p):
        text = f"the cluster's Jobs API (dashboard) address; default $RAY_ADDRESS, else {jobs.DEFAULT_ADDRESS}"
        p.add_argument("--address", default=jobs.default_address(), help=text)
        return p

    p = with_address(with_set(sub.add_parser("submit", help="submit the job to a Ray cluster as a Ray Job")))
    p.add_argument("spec")
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 0 only if the job succeeds")
    p.set_defaults(func=cmd_submit)

    p = with_address(sub.add_parser("status", help="a submitted job's status"))
    p.add_argument("job_id")
    p.set_defaults(func=cmd_status)

    p = with_address(sub.add_parser("logs", help="a submitted job's logs"))
    p.add_argument("job_id")
    p.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it succeeds")
    p.set_defaults(func=cmd_logs)

    p = with_address(sub.add_parser("stop", help="stop a submitted job and wait until it has stopped"))
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to stop")
    p.set_defaults(func=cmd_stop)

    p = with_address(sub.add_parser("list", help="the jobs submitted to the cluster"))
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    from raydistill.engine_args import remote_code_consent

    args = build_parser().parse_args(argv)
    try:
        with remote_code_consent(getattr(args, "trust_remote_code", False)):
            return args.func(args)
    except SpecError as err:
        return _print_errors(err)
    except jobs.ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (RunDirBusy, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
