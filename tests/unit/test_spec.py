"""JobSpec loading, overrides and error reporting."""

from pathlib import Path

import pytest
import yaml

from raydistill.cli import main
from raydistill.spec import JobSpec, SpecError, dump_spec, load_spec

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _write(tmp_path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _minimal(tmp_path) -> dict:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    return {
        "teacher": {"model": "tiny:teacher"},
        "student": {"model": "tiny:student"},
        "data": {"path": str(corpus)},
        "runtime": {"run_dir": str(tmp_path / "run")},
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(config, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_spec(config)
    assert isinstance(spec, JobSpec)


def test_defaults_and_public_keys(tmp_path):
    spec = load_spec(_write(tmp_path, _minimal(tmp_path)))
    assert spec.serve.host == "127.0.0.1" and spec.serve.port == 8000
    assert spec.train.zero_stage == 2 and spec.train.workers == 2
    assert spec.teacher_pass.mode == "generate" and spec.distill.loss == "forward_kl"
    assert spec.data.prompt_field == "prompt"


def test_three_independent_mistakes_reported_at_once(tmp_path):
    raw = _minimal(tmp_path)
    raw["train"] = {"zero_stage": 4}
    raw["teacher_pass"] = {"top_k": 0}
    raw["serve"] = {"port": "http"}
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, raw))
    text = "\n".join(err.value.errors)
    assert len(err.value.errors) == 3, text
    assert "train.zero_stage: 4" in text
    assert "teacher_pass.top_k: 0" in text
    assert "serve.port: 'http'" in text


def test_unknown_and_missing_keys(tmp_path):
    raw = _minimal(tmp_path)
    del raw["runtime"]
    raw["trian"] = {"workers": 1}
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, raw))
    assert sorted(e.split(":")[0] for e in err.value.errors) == ["runtime", "trian"]


def test_missing_paths_named(tmp_path):
    raw = _minimal(tmp_path)
    raw["data"]["path"] = str(tmp_path / "absent.jsonl")
    raw["student"]["model"] = str(tmp_path / "no-model")
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, raw))
    keys = sorted(e.split(":")[0] for e in err.value.errors)
    assert keys == ["data.path", "student.model"]


def test_set_overrides_are_typed(tmp_path):
    path = _write(tmp_path, _minimal(tmp_path))
    spec = load_spec(path, ["train.workers=1", "train.lr=0.5", "eval.enabled=false", "teacher.engine_args.max_model_len=256"])
    assert spec.train.workers == 1 and spec.train.lr == 0.5 and spec.eval.enabled is False
    assert spec.teacher.engine_args == {"max_model_len": 256}
    with pytest.raises(SpecError, match="train.workers"):
        load_spec(path, ["train.workers=zero"])
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        load_spec(path, ["train.workers"])


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    raw = _minimal(tmp_path)
    raw["data"]["path"] = "c.jsonl"
    raw["runtime"]["run_dir"] = "runs/x"
    monkeypatch.chdir(tmp_path)
    spec = load_spec(_write(tmp_path, raw))
    assert spec.data.path == str(tmp_path / "c.jsonl")
    assert spec.runtime.run_dir == str(tmp_path / "runs" / "x")


def test_resolved_spec_round_trips(tmp_path):
    spec = load_spec(_write(tmp_path, _minimal(tmp_path)), ["train.max_steps=3"])
    again = JobSpec.model_validate(yaml.safe_load(dump_spec(spec)))
    assert again == spec


def test_every_field_is_documented():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{prefix}{name}.")

    walk(JobSpec)


def test_bad_yaml_and_not_a_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("teacher: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(p)


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = _write(tmp_path, _minimal(tmp_path))
    assert main(["validate", str(good)]) == 0
    assert main(["validate", str(good), "--set", "train.zero_stage=4", "--set", "teacher_pass.top_k=-1", "--set", "serve.port=0"]) == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    for key in ("train.zero_stage: 4", "teacher_pass.top_k: -1", "serve.port: 0"):
        assert key in err
    assert "Traceback" not in err


def test_jsd_beta_out_of_range_rejected(tmp_path):
    raw = _minimal(tmp_path)
    raw["distill"] = {"loss": "jsd", "jsd_beta": 1.5}
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, raw))
    assert len(err.value.errors) == 1 and err.value.errors[0].startswith("distill.jsd_beta: 1.5"), err.value.errors
    raw["distill"] = {"loss": "skew_reverse_kl", "skew_alpha": 0.0}
    assert load_spec(_write(tmp_path, raw)).distill.skew_alpha == 0.0


def test_cpu_engine_env_binds_the_chosen_cores(tmp_path):
    import os

    raw = _minimal(tmp_path)
    assert load_spec(_write(tmp_path, raw)).teacher.cpu_engine_env() == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    raw["teacher"].update(cpu_threads_bind="all", cpu_kv_cache_gib=3)
    env = load_spec(_write(tmp_path, raw)).teacher.cpu_engine_env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert [int(c) for c in env["VLLM_CPU_OMP_THREADS_BIND"].split(",")] == sorted(os.sched_getaffinity(0))
    raw["teacher"]["cpu_threads_bind"] = "0-3|4-7"
    assert load_spec(_write(tmp_path, raw)).teacher.cpu_engine_env()["VLLM_CPU_OMP_THREADS_BIND"] == "0-3|4-7"
    raw["teacher"]["cpu_threads_bind"] = "every core"
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, raw))
    assert "teacher.cpu_threads_bind: 'every core'" in str(err.value)


@pytest.mark.parametrize("run_dir,reason", [("", "is empty"), ("/", "root directory"), ("~", "home directory"), ("HERE", "not a raydistill run")])
def test_unsafe_run_dirs_are_refused(tmp_path, run_dir, reason):
    raw = _minimal(tmp_path)
    # tmp_path holds the corpus and no manifest: a directory of other files.
    raw["runtime"]["run_dir"] = str(tmp_path) if run_dir == "HERE" else run_dir
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, raw))
    assert len(err.value.errors) == 1 and err.value.errors[0].startswith("runtime.run_dir: ") and reason in err.value.errors[0]


def test_a_new_or_earlier_run_dir_is_accepted(tmp_path):
    raw = _minimal(tmp_path)
    run = tmp_path / "run"
    assert load_spec(_write(tmp_path, raw)).runtime.run_dir == str(run)  # does not exist yet
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    (run / "signals").mkdir()
    assert load_spec(_write(tmp_path, raw)).runtime.run_dir == str(run)  # an earlier run's directory


def test_engine_args_are_checked_against_vllm(tmp_path):
    raw = _minimal(tmp_path)
    raw["teacher"]["engine_args"] = {"max_model_length": 512, "enforce_eager": True}
    raw["serve"] = {"engine_args": {"max_model_len": "abc", "dtype": "auto"}}
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, raw))
    teacher, serve = sorted(err.value.errors)[1], sorted(err.value.errors)[0]
    assert teacher.startswith("teacher.engine_args: ") and "max_model_length: not a vLLM engine argument (did you mean max_model_len?)" in teacher
    assert serve.startswith("serve.engine_args: ") and "max_model_len: 'abc' is not valid for vLLM" in serve
    raw["teacher"]["engine_args"] = {"max_model_len": 512, "dtype": "float32", "enforce_eager": True, "max_logprobs": 32}
    raw["serve"]["engine_args"] = {"max_model_len": 256}
    assert load_spec(_write(tmp_path, raw)).teacher.engine_args["max_model_len"] == 512


@pytest.mark.parametrize("section", ["teacher", "serve", "distill.on_policy"])
def test_trust_remote_code_needs_the_command_line(tmp_path, section):
    from raydistill.engine_args import remote_code_consent

    raw = _minimal(tmp_path)
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node["engine_args"] = {"trust_remote_code": True}
    path = _write(tmp_path, raw)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert any(e.startswith(f"{section}.engine_args: ") and "--trust-remote-code" in e for e in err.value.errors)
    with remote_code_consent(True):
        spec = load_spec(path)
    got = spec
    for part in section.split("."):
        got = getattr(got, part)
    assert got.engine_args == {"trust_remote_code": True}
    # Consent ends with the block; an explicit false never needs it.
    with pytest.raises(SpecError):
        load_spec(path)
    node["engine_args"] = {"trust_remote_code": False}
    load_spec(_write(tmp_path, raw))
    # --set is part of the spec too: it cannot consent either.
    with pytest.raises(SpecError):
        load_spec(_write(tmp_path, _minimal(tmp_path)), [f"{section}.engine_args.trust_remote_code=true"])


def test_validate_cli_flag_consents_to_remote_code(tmp_path, capsys):
    raw = _minimal(tmp_path)
    raw["teacher"]["engine_args"] = {"trust_remote_code": True}
    path = _write(tmp_path, raw)
    assert main(["validate", str(path)]) == 2
    assert "trust_remote_code: True runs Python code shipped with the model" in capsys.readouterr().err
    assert main(["validate", str(path), "--trust-remote-code"]) == 0
