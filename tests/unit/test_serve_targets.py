"""What ``raydistill serve PATH...`` resolves to: model directories, model ids, the teacher."""

from __future__ import annotations

import pytest
import yaml

from raydistill.serving.targets import TEACHER_ID, base_serve_section, resolve_source, served_models
from raydistill.spec import SpecError


def _run(tmp_path, name: str, serve: dict | None = None, teacher: str = "tiny:teacher"):
    run = tmp_path / name
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text("{}")
    spec = {"teacher": {"model": teacher}, "runtime": {"run_dir": str(run)}, "serve": serve or {"port": 8000}}
    (run / "spec.yaml").write_text(yaml.safe_dump(spec))
    return run


def test_run_dir_student_dir_and_spec_resolve_to_the_same_student(tmp_path):
    run = _run(tmp_path, "try1")
    for path in (run, run / "student", run / "spec.yaml"):
        src = resolve_source(str(path))
        assert src.student_dir == str(run / "student") and src.run_name == "try1"
        assert src.spec["teacher"]["model"] == "tiny:teacher"


def test_plain_model_dir_is_named_after_itself(tmp_path):
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text("{}")
    src = resolve_source(str(tmp_path / "my-model"))
    assert src.run_name == "my-model" and src.spec == {}
    assert [m.model_id for m in served_models([src], None, None)] == ["my-model"]


def test_not_servable_path_is_explained(tmp_path):
    with pytest.raises(SpecError, match="not a run directory"):
        resolve_source(str(tmp_path))


def test_model_ids_from_spec_run_name_and_override(tmp_path):
    a = resolve_source(str(_run(tmp_path, "a", serve={"model_id": "alpha"})))
    b = resolve_source(str(_run(tmp_path, "b")))
    assert [m.model_id for m in served_models([a, b], None, None)] == ["alpha", "b"]
    assert [m.model_id for m in served_models([b], "custom", None)] == ["custom"]
    with pytest.raises(SpecError, match="names one model"):
        served_models([a, b], "custom", None)
    assert base_serve_section([a, b]) == {"model_id": "alpha"}


def test_duplicate_ids_are_refused(tmp_path):
    a = resolve_source(str(_run(tmp_path / "x", "same")))
    b = resolve_source(str(_run(tmp_path / "y", "same")))
    with pytest.raises(SpecError, match="unique"):
        served_models([a, b], None, None)


def test_teacher_from_the_run_or_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path / "cache"))
    teacher_dir = tmp_path / "t"
    teacher_dir.mkdir()
    (teacher_dir / "config.json").write_text("{}")
    src = resolve_source(str(_run(tmp_path, "r", teacher=str(teacher_dir))))
    models = served_models([src], None, "auto")
    assert models[-1].model_id == TEACHER_ID and models[-1].path == str(teacher_dir)
    assert served_models([src], None, str(teacher_dir))[-1].path == str(teacher_dir)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(SpecError, match="records a teacher"):
        served_models([resolve_source(str(plain))], None, "auto")
