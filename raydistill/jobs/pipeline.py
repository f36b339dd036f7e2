"""The pipeline: teacher -> train -> eval -> serve-check, each recorded in the run's manifest."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from raydistill.jobs.manifest import STAGES, Manifest
from raydistill.spec import JobSpec, dump_spec


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


def _first_eval_prompt(signals_dir: Path) -> str:
    from raydistill.data.signals import load_signals

    table = load_signals(signals_dir, columns=["prompt", "split"])
    prompts = [p for p, s in zip(table["prompt"].to_pylist(), table["split"].to_pylist()) if s == "eval"]
    return (prompts or table["prompt"].to_pylist())[0]


def run_pipeline(spec: JobSpec, stages: list[str] | None = None) -> dict:
    """Run the selected stages (all by default), skipping those the manifest marks succeeded."""
    from raydistill.distill.train import run_train_stage
    from raydistill.eval.stage import run_eval_stage
    from raydistill.models import resolve_model
    from raydistill.serving.app import serve_check
    from raydistill.teacher.stage import run_teacher_stage

    stages = list(stages or STAGES)
    run_dir = Path(spec.runtime.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(dump_spec(spec))
    manifest = Manifest(run_dir)
    teacher_path = resolve_model(spec.teacher.model)
    # A pruned student is built from the teacher by the train stage; there is no path to resolve.
    student_path = resolve_model(spec.student.model) if spec.student.model else None
    models = {"teacher": teacher_path, "student_init": student_path or f"{spec.student.init} of the teacher"}
    builtin_note = Path(teacher_path) / "raydistill_builtin.json"
    if builtin_note.exists():  # how a builtin teacher was made (e.g. the Gemma GGUF conversion)
        models["teacher_conversion"] = json.loads(builtin_note.read_text())
    manifest.set_info("models", models)
    manifest.set_info("versions", _versions())
    signals_dir = run_dir / "signals"
    student_dir = run_dir / "student"

    init_ray(spec.runtime)
    for name in (s for s in STAGES if s in stages):
        if name == "eval" and not spec.eval.enabled:
            print("==> [eval] disabled by eval.enabled=false; skipping", flush=True)
            continue
        if manifest.succeeded(name):
            print(f"==> [{name}] already succeeded in {run_dir}; skipping", flush=True)
            continue
        print(f"==> [{name}] starting ({time.strftime('%H:%M:%S')})", flush=True)
        with manifest.stage(name) as out:
            if name == "teacher":
                out.update(run_teacher_stage(spec.data, spec.teacher, spec.teacher_pass, teacher_path, str(signals_dir)))
            elif name == "train":
                out.update(run_train_stage(spec.train, spec.distill, student_path, str(signals_dir), str(run_dir), student=spec.student, teacher_path=teacher_path))
            elif name == "eval":
                out.update(run_eval_stage(spec.eval, spec.train.max_seq_len, str(student_dir), teacher_path, str(signals_dir), str(run_dir),
                                          spec.teacher.engine_args, spec.teacher.cpu_engine_env()))
            elif name == "serve-check":
                out.update(serve_check(str(student_dir), spec.model_id, spec.serve, _first_eval_prompt(signals_dir)))
                print(f"[serve-check] {out['prompt']!r} -> {out['answer']!r}", flush=True)
        print(f"==> [{name}] succeeded in {manifest.data['stages'][name]['seconds']}s", flush=True)
    return manifest.data
