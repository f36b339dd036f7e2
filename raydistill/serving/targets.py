"""What ``raydistill serve PATH...`` serves: model directories and the ids clients ask for.

A PATH is a run directory (its ``student/``), a student (model) directory, or a job spec (its
run directory). Saved specs are read as plain YAML, not re-validated: a finished run must stay
servable even if its corpus has moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from raydistill.spec import SpecError

TEACHER_ID = "teacher"


@dataclass(frozen=True)
class Served:
    model_id: str
    path: str


@dataclass(frozen=True)
class Source:
    """One PATH, resolved: the student directory plus what its run's spec says."""

    student_dir: str
    run_name: str
    spec: dict  # the run's spec.yaml (or the given spec file) as plain YAML; {} without one


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SpecError([f"{path}: cannot read ({err})"]) from None
    return raw if isinstance(raw, dict) else {}


def resolve_source(path: str) -> Source:
    p = Path(path).expanduser()
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        spec = _read_yaml(p)
        run_dir = (spec.get("runtime") or {}).get("run_dir")
        if not run_dir:
            raise SpecError([f"{path}: runtime.run_dir is missing, so there is no run to serve"])
        run = Path(run_dir)
        if not (run / "student" / "config.json").exists():
            raise SpecError([f"{path}: its run {run} has no student/ yet (run the job first)"])
        return Source(str(run / "student"), run.name, spec)
    if (p / "student" / "config.json").exists():
        spec = _read_yaml(p / "spec.yaml") if (p / "spec.yaml").exists() else {}
        return Source(str(p / "student"), p.resolve().name, spec)
    if (p / "config.json").exists():
        run = p.resolve().parent
        # A run's own student/ is named after the run, as the run directory would be.
        if p.name == "student" and (run / "spec.yaml").exists():
            return Source(str(p), run.name, _read_yaml(run / "spec.yaml"))
        return Source(str(p), p.resolve().name, {})
    raise SpecError([f"{path}: not a run directory (with student/), a model directory (with config.json) or a spec file"])


def base_serve_section(sources: list[Source]) -> dict:
    """The ``serve`` section the first run was made with; ``--set serve.*`` applies on top."""
    for s in sources:
        section = s.spec.get("serve")
        if isinstance(section, dict):
            return dict(section)
    return {}


def served_models(sources: list[Source], model_id: str | None, teacher: str | None) -> list[Served]:
    """One entry per student (id: ``serve.model_id`` or the run's name), plus the teacher if asked.

    ``model_id`` is an explicit ``--set serve.model_id``; it names a single student only.
    ``teacher`` is a model reference, or ``"auto"`` for the first run's own teacher.
    """
    from raydistill.models import resolve_model

    errors = []
    if model_id and len(sources) > 1:
        errors.append(f"serve.model_id: {model_id!r} names one model, but {len(sources)} students were given; their run names are used instead")
    out = []
    for s in sources:
        own = (s.spec.get("serve") or {}).get("model_id")
        out.append(Served(model_id or own or s.run_name, s.student_dir))
    if teacher:
        ref = teacher
        if teacher == "auto":
            ref = next(((s.spec.get("teacher") or {}).get("model") for s in sources if (s.spec.get("teacher") or {}).get("model")), None)
            if ref is None:
                errors.append("--teacher: none of the given paths records a teacher (a run's spec.yaml); name one, e.g. --teacher tiny:teacher")
        if ref:
            try:
                path = resolve_model(ref)
            except ValueError as err:
                errors.append(f"--teacher: {err}")
            else:
                if not (Path(path) / "config.json").exists():
                    errors.append(f"--teacher: {ref!r} is not a model directory (no config.json)")
                out.append(Served(TEACHER_ID, path))
    from raydistill.engine_args import remote_code_allowed
    from raydistill.models import ships_code

    if not remote_code_allowed():
        errors += [f"{m.path}: this model ships its own Python code (auto_map), which serving would run; refused unless the command "
                   "line says --trust-remote-code (with serve.engine_args.trust_remote_code: true)" for m in out if ships_code(m.path)]
    ids = [m.model_id for m in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        errors.append(f"model ids must be unique, but {', '.join(dupes)} appear more than once; serve runs with different names")
    if errors:
        raise SpecError(errors)
    return out
