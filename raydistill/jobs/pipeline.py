"""The pipeline: the table of stages (``raydistill.jobs.stages``) run like a build.

A stage runs when its inputs' fingerprint differs from the one recorded when it last
succeeded, and so does everything downstream of it; ``plan`` says which and why before
anything runs (``raydistill run --dry-run`` prints only that).
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from raydistill.jobs import fingerprint as fp
from raydistill.jobs.manifest import Manifest
from raydistill.jobs.rundir import RunDir
from raydistill.jobs.stages import STAGES, Stage, StageContext
from raydistill.spec import JobSpec, dump_spec
from raydistill.fileio import write_atomic


def init_ray(runtime) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    # Inside a Ray Job (or with RAY_ADDRESS exported) there is a cluster to join already.
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        # More logical CPUs than cores on purpose: Serve's proxy and ingress, Data's actors and
        # Train's workers each reserve one, and mostly wait.
        ray.init(num_cpus=runtime.num_cpus, runtime_env=env)


def _versions() -> dict:
    import deepspeed
    import ray
    import torch
    import transformers

    import raydistill

    out = {"python": platform.python_version(), "raydistill": raydistill.__version__, "ray": ray.__version__,
           "torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__}
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except ImportError:
        out["vllm"] = None
    return out


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


def print_plan(steps: list[Step], run: RunDir) -> None:
    print(f"==> plan for {run.root}", flush=True)
    for s in steps:
        print(f"  {s.stage.name:12s} {s.action:12s} {s.reason}", flush=True)


def _context(spec: JobSpec, run: RunDir) -> StageContext:
    from raydistill.models import resolve_model

    # A pruned student is built from the teacher by the train stage; there is no path to resolve.
    student_path = resolve_model(spec.student.model) if spec.student.model else None
    return StageContext(spec, run, resolve_model(spec.teacher.model), student_path)


def run_pipeline(spec: JobSpec, stages: list[str] | None = None, force: tuple[str, ...] = (), dry_run: bool = False) -> dict:
    """Run the stages whose inputs changed since they last succeeded (and those in ``force``); with ``dry_run``, only print the plan.

    ``stages`` limits the run to those stages; others whose inputs changed are marked stale.
    """
    run = RunDir.of(spec.runtime.run_dir)
    ctx = _context(spec, run)
    if dry_run:
        steps = plan(spec, Manifest(run.root).data if run.manifest.exists() else {"stages": {}}, ctx, stages, force)
        print_plan(steps, run)
        return {"plan": [{"stage": s.stage.name, "action": s.action, "reason": s.reason} for s in steps]}

    run.root.mkdir(parents=True, exist_ok=True)
    # The lock first, then the plan: it must be made from the manifest as no other run can change it.
    with run_lock(run):
        manifest = Manifest(run.root)
        steps = plan(spec, manifest.data, ctx, stages, force)
        print_plan(steps, run)
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
        to_run = [s for s in steps if s.action == "run"]
        if to_run:
            init_ray(spec.runtime)
        for step in to_run:
            _run_step(step, ctx, manifest)
        return manifest.data


def _run_step(step: Step, ctx: StageContext, manifest: Manifest) -> None:
    import shutil

    name, prev = step.stage.name, manifest.entry(step.stage.name)
    if prev and (prev.get("fingerprint") != step.fingerprint or step.reason == "forced"):
        # Outputs of other inputs must not be resumed from (a teacher pass on another corpus,
        # a checkpoint of another student): start afresh.
        for path in step.stage.outputs(ctx.run):
            if path.exists():
                print(f"==> [{name}] clearing {path} ({step.reason})", flush=True)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"==> [{name}] starting ({time.strftime('%H:%M:%S')}): {step.reason}", flush=True)
    with manifest.stage(name, fingerprint=step.fingerprint, inputs=step.inputs, spec=step.fields, output_id=step.output_id,
                        runs=prev.get("runs", 0) + 1) as out:
        out.update(step.stage.run(ctx))
    print(f"==> [{name}] succeeded in {manifest.entry(name)['seconds']}s", flush=True)


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

