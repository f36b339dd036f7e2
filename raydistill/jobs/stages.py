"""The table of stages: what each reads and writes, and the one function that runs it.

``run``, ``eval`` and anything later read this table (``raydistill.jobs.pipeline``); nothing
dispatches on a stage's name. A stage's inputs are the spec fields it reads (minus the ones
that change how it runs but not what it produces), the models it loads, the corpus, and the
outputs of the stages it reads from; their fingerprint decides whether it runs again
(``raydistill.jobs.fingerprint``). Its outputs are paths of the ``RunDir``, cleared before it
runs on changed inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from raydistill.jobs.rundir import RunDir
from raydistill.spec import JobSpec

if TYPE_CHECKING:
    from raydistill.jobs.tracking import TrackedRun


@dataclass(frozen=True)
class StageContext:
    """What every stage function receives: the spec, the run's paths and the resolved models."""

    spec: JobSpec
    run: RunDir
    teacher_path: str
    student_path: str | None  # None for a student pruned from the teacher (built by train)
    tracking: "TrackedRun | None" = None  # the MLflow run (tracking.mlflow), started by the pipeline


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    reads: tuple[str, ...]  # dotted spec keys
    ignores: tuple[str, ...] = ()  # keys under ``reads`` that do not change the outputs
    after: tuple[str, ...] = ()  # stages whose outputs it reads
    models: Callable[[StageContext], dict[str, str]] = lambda ctx: {}  # role -> model directory it loads
    reads_corpus: bool = False
    outputs: Callable[[RunDir], tuple[Path, ...]] = lambda run: ()
    enabled: Callable[[JobSpec], bool] = lambda spec: True
    # What it logs to the MLflow run once it succeeded; with replay=True, what its outputs of an earlier
    # run put into a new MLflow run (one started for a changed spec) when this run skips it.
    track: Callable[[StageContext, "TrackedRun", bool], None] = lambda ctx, tracked, replay: None


def _teacher(ctx: StageContext) -> dict:
    from raydistill.teacher.stage import run_teacher_stage

    s = ctx.spec
    if s.teachers is not None:
        from raydistill.teacher.multi import run_multi_teacher_stage

        return run_multi_teacher_stage(s.data, s.teachers, s.teacher_pass, list(_teacher_models(ctx).values()), str(ctx.run.signals))
    return run_teacher_stage(s.data, s.teacher, s.teacher_pass, ctx.teacher_path, str(ctx.run.signals))


def _loop_teacher_pass(ctx: StageContext, data, teacher_pass, signals_dir: str, writer: bool) -> dict:
    """A teacher pass of the loop's ``expand`` over ``data``: the job's own (every teacher, as routed), or with ``writer``
    the pass that writes prompts, by each domain's teacher under domain routing and by the first teacher otherwise."""
    from raydistill.teacher.stage import run_teacher_stage

    s = ctx.spec
    if s.teachers is not None and (not writer or teacher_pass.routing == "domain"):
        from raydistill.teacher.multi import run_multi_teacher_stage

        return run_multi_teacher_stage(data, s.teachers, teacher_pass, list(_teacher_models(ctx).values()), signals_dir)
    return run_teacher_stage(data, s.teacher, teacher_pass, ctx.teacher_path, signals_dir)


def _teacher_models(ctx: StageContext) -> dict[str, str]:
    """Role -> directory of every teacher the pass runs: ``teacher``, or ``teacher:<name>`` for each of several."""
    from raydistill.models import resolve_model

    if ctx.spec.teachers is None:
        return {"teacher": ctx.teacher_path}
    return {f"teacher:{t.name}": resolve_model(t.model) for t in ctx.spec.teachers}


def _train(ctx: StageContext) -> dict:
    from raydistill.distill.train import run_train_stage

    from raydistill.distill.model_card import write_model_card

    s = ctx.spec

    def train_round(run, student_path, first: bool) -> dict:
        # The first round initializes the student as the spec says; later ones continue from the last round's.
        # A round of the loop logs its steps under its own directory's name (rounds/<r>/train/...), as each starts at step 1.
        prefix = "train/" if run.root == ctx.run.root else f"{run.root.relative_to(ctx.run.root).as_posix()}/train/"
        return run_train_stage(s.train, s.distill, ctx.student_path if first else student_path, ctx.run.signals if first else run.signals, run,
                               student=s.student if first else None, teacher_path=ctx.teacher_path, teacher=s.teacher, teacher_pass=s.teacher_pass,
                               tracking=ctx.tracking, tracking_prefix=prefix)

    if s.loop is not None and s.loop.rounds > 1:
        from raydistill.loop.rounds import run_loop

        out = run_loop(s, ctx.run, train_round, lambda data, teacher_pass, signals_dir, writer: _loop_teacher_pass(ctx, data, teacher_pass, signals_dir, writer))
    else:
        out = train_round(ctx.run, None, True)
    out["model_card"] = str(write_model_card(s, ctx.run, ctx.teacher_path))
    return out


def _track_train(ctx: StageContext, tracked: "TrackedRun", replay: bool) -> None:
    # Live, rank 0 logged each step; a replay reads them back from the history the stage left.
    metrics = ctx.run.train / "metrics.jsonl"
    if replay and metrics.exists():
        import json

        tracked.log_history(json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    if ctx.run.student.exists():
        tracked.set_student(ctx.run.student)


def _track_eval(ctx: StageContext, tracked: "TrackedRun", replay: bool) -> None:
    tracked.log_eval(ctx.run)


def _eval(ctx: StageContext) -> dict:
    from raydistill.eval.stage import run_eval_stage

    from raydistill.distill.model_card import write_model_card

    s = ctx.spec
    out = run_eval_stage(s.eval, s.train.max_seq_len, str(ctx.run.student), ctx.teacher_path, ctx.run.signals, ctx.run,
                         s.teacher.engine_args, s.teacher.cpu_engine_env())
    write_model_card(s, ctx.run, ctx.teacher_path)  # with the report's figures
    return out


def _serve_check(ctx: StageContext) -> dict:
    from raydistill.data.signals import load_signals
    from raydistill.serving.app import serve_check

    table = load_signals(ctx.run.signals, columns=["prompt", "split"])
    prompts = [p for p, s in zip(table["prompt"].to_pylist(), table["split"].to_pylist()) if s == "eval"]
    out = serve_check(str(ctx.run.student), ctx.spec.model_id, ctx.spec.serve, (prompts or table["prompt"].to_pylist())[0])
    print(f"[serve-check] {out['prompt']!r} -> {out['answer']!r}", flush=True)
    return out


def _train_models(ctx: StageContext) -> dict[str, str]:
    models = {"teacher": ctx.teacher_path} if ctx.student_path is None else {"student": ctx.student_path}
    if ctx.spec.distill.mode == "on_policy":
        models["teacher"] = ctx.teacher_path  # it scores the rollouts
    return models


# Keys that change how a stage runs (its parallelism, cadence, placement) but not what it produces.
_TEACHER_RUNTIME = ("teacher_pass.shard_rows",)
_TRAIN_RUNTIME = ("train.checkpoint_every", "train.checkpoints_to_keep", "train.max_failures", "train.tensorboard")
_SERVE_RUNTIME = ("serve.host", "serve.port", "serve.app_name", "serve.api_key_env", "serve.min_replicas", "serve.max_replicas",
                  "serve.target_ongoing_requests", "serve.max_ongoing_requests", "serve.replica_resources",
                  "serve.health_check_period_s", "serve.health_check_timeout_s", "serve.allow_unauthenticated", "serve.cors_origins",
                  "serve.extra_routes", "serve.max_body_bytes", "serve.cpu_threads_bind", "serve.max_queued_requests",
                  "serve.retry_after_s")

STAGES: tuple[Stage, ...] = (
    Stage("teacher", _teacher, reads=("teacher.model", "teacher.engine_args", "teachers", "data", "teacher_pass"), ignores=_TEACHER_RUNTIME,
          models=_teacher_models, reads_corpus=True, outputs=lambda run: (run.signals,)),
    Stage("train", _train, reads=("student", "distill", "train", "loop"), ignores=_TRAIN_RUNTIME, after=("teacher",), models=_train_models,
          outputs=lambda run: (run.checkpoints, run.train, run.student_init, run.student, run.on_policy, run.rounds), track=_track_train),
    Stage("eval", _eval, reads=("eval", "train.max_seq_len", "teacher.engine_args"), ignores=("eval.enabled", "eval.num_cpus"),
          after=("teacher", "train"), models=lambda ctx: {"teacher": ctx.teacher_path}, outputs=lambda run: (run.eval,),
          enabled=lambda spec: spec.eval.enabled, track=_track_eval),
    Stage("serve-check", _serve_check, reads=("serve",), ignores=_SERVE_RUNTIME, after=("teacher", "train")),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
