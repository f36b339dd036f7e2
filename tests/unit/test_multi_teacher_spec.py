"""``teachers:`` and ``teacher_pass.routing``: validated once, every problem named with its teacher and key."""

import pytest
import yaml

from raydistill.jobs.fingerprint import spec_fields
from raydistill.spec import SpecError, TeacherSpec, dump_spec, spec_from_dict


def _raw(tmp_path, routing="ensemble", **teacher_extra) -> dict:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "hi", "domain": "a"}\n')
    return {
        "teachers": [{"name": "one", "model": "tiny:teacher", **teacher_extra}, {"name": "two", "model": "tiny:teacher2", "weight": 3.0}],
        "student": {"model": "tiny:student"},
        "data": {"path": str(corpus)},
        "teacher_pass": {"routing": routing},
        "runtime": {"run_dir": str(tmp_path / "run")},
    }


def _errors(raw) -> list[str]:
    with pytest.raises(SpecError) as err:
        spec_from_dict(raw)
    return err.value.errors


def test_teacher_is_the_first_teacher_and_a_dump_reads_back(tmp_path):
    spec = spec_from_dict(_raw(tmp_path, replicas=2, engine_args={"max_model_len": 256}))
    assert isinstance(spec.teacher, TeacherSpec) and not hasattr(spec.teacher, "weight")
    assert spec.teacher.model == "tiny:teacher" and spec.teacher.replicas.max == 2 and spec.teacher.engine_args == {"max_model_len": 256}
    assert [t.weight for t in spec.teachers] == [1.0, 3.0]
    again = spec_from_dict(yaml.safe_load(dump_spec(spec)))
    assert again == spec


def test_one_teacher_section_only(tmp_path):
    raw = _raw(tmp_path)
    raw["teacher"] = {"model": "tiny:student"}
    assert _errors(raw) == ["give either teacher: or teachers:, not both"]
    raw.pop("teacher")
    raw.pop("teachers")
    raw["teacher_pass"] = {}
    assert _errors(raw) == ["teacher: required section is missing (or give teachers:)"]


def test_routing_goes_with_several_teachers(tmp_path):
    raw = _raw(tmp_path, routing=None)
    assert "teacher_pass.routing: required with teachers: ('domain' or 'ensemble')" in _errors(raw)
    single = _raw(tmp_path)
    single["teacher"] = single.pop("teachers")[0]
    single["teacher"].pop("name")
    assert _errors(single) == ["teacher_pass.routing: only used with several teachers (teachers:)"]


def test_weights_must_be_positive_and_names_unique(tmp_path):
    raw = _raw(tmp_path)
    raw["teachers"][1]["weight"] = 0
    assert any(e.startswith("teachers.1.weight:") for e in _errors(raw))
    raw["teachers"][1]["weight"] = 1
    raw["teachers"][1]["name"] = "one"
    assert _errors(raw) == ["teachers[1].name: 'one' is used by an earlier teacher"]


def test_domain_routing_problems_are_all_reported_at_once(tmp_path):
    raw = _raw(tmp_path, routing="domain", domains=["a", "b"])
    raw["teachers"][1]["domains"] = []
    raw["teachers"].append({"name": "three", "model": "tiny:teacher", "domains": ["b"]})
    errors = _errors(raw)
    assert "data.domain_field: required with teacher_pass.routing: domain (the key of each row's domain)" in errors
    assert "teachers[1].domains: teacher 'two' lists no domain (routing: domain)" in errors
    assert "teachers[2].domains: domain 'b' of teacher 'three' is also teacher 'one''s" in errors
    assert len(errors) == 3


def test_ensemble_has_no_domains_and_on_policy_needs_one_teacher(tmp_path):
    raw = _raw(tmp_path, domains=["a"])
    raw["distill"] = {"mode": "on_policy"}
    errors = _errors(raw)
    assert "teachers[0].domains: only used with teacher_pass.routing: domain (teacher 'one')" in errors
    assert any(e.startswith("distill.mode: on_policy") for e in errors)


def test_top_k_is_checked_against_every_teacher(tmp_path):
    raw = _raw(tmp_path)
    raw["teachers"][1]["engine_args"] = {"max_logprobs": 4}
    raw["teacher_pass"]["top_k"] = 8
    assert _errors(raw) == ["teacher_pass.top_k: 8 exceeds teachers[1].engine_args.max_logprobs (4)"]


def test_domain_routing_spec_is_valid(tmp_path):
    raw = _raw(tmp_path, routing="domain", domains=["a"])
    raw["teachers"][1]["domains"] = ["b"]
    raw["data"]["domain_field"] = "domain"
    spec = spec_from_dict(raw)
    from raydistill.spec import domain_owners

    assert domain_owners(spec.teachers) == {"a": "one", "b": "two"}


def test_unset_optional_keys_leave_fingerprints_as_they_were():
    """A key added to the spec later with no value (teachers, data.domain_field) reads as absent."""
    old = {"data": {"path": "x", "eval_fraction": 0.1}, "teacher": {"model": "m"}}
    new = {"data": {"path": "x", "eval_fraction": 0.1, "domain_field": None}, "teacher": {"model": "m"}, "teachers": None}
    reads = ("teacher.model", "teachers", "data")
    assert spec_fields(new, reads) == spec_fields(old, reads) == {"teacher.model": "m", "data.path": "x", "data.eval_fraction": 0.1}


def test_teachers_must_share_the_students_tokenizer(tmp_path):
    """What ``validate`` adds to the spec's checks for several teachers: each teacher's tokenizer against the student's."""
    import shutil

    from transformers import AutoTokenizer

    from raydistill.models import resolve_model
    from raydistill.spec import TeacherEntry
    from raydistill.teacher.multi import check_shared_tokenizer, student_tokenizer_errors

    teacher, student = resolve_model("tiny:teacher"), resolve_model("tiny:student")
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<a-token-the-student-lacks>"])
    tok.save_pretrained(other)
    teachers = [TeacherEntry(name="one", model="tiny:teacher"), TeacherEntry(name="two", model=str(other))]
    assert student_tokenizer_errors(teachers, [teacher, str(other)], student) == [
        f"teachers[1].model: {other} ('two') does not share the student's tokenizer (fingerprint differs)"]
    assert student_tokenizer_errors(teachers[:1], [teacher], None) == []  # pruned from the first teacher: its tokenizer
    with pytest.raises(ValueError, match=r"teachers\[1\] \('two'"):
        check_shared_tokenizer(teachers, [teacher, str(other)])
