"""Submitting to a cluster, without one: the job we build, the checks, token discovery, the CLI's arguments."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from raydistill.cli import _run_spec, build_parser, main
from raydistill.jobs.submit import (
    SPEC_ENV_VAR,
    AuthToken,
    ClusterError,
    auth_error_message,
    auth_headers,
    default_address,
    find_auth_token,
    format_job_table,
    prepare_submission,
)
from raydistill.spec import SpecError


def _spec(tmp_path: Path, runtime: dict | None = None, data_path: str | None = None) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    raw = {
        "teacher": {"model": "tiny:teacher"},
        "student": {"model": "tiny:student"},
        "data": {"path": data_path or str(corpus)},
        "runtime": {"run_dir": str(tmp_path / "run"), **(runtime or {})},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# --------------------------------------------------------------------------- the job we build


def test_entrypoint_and_runtime_env_carry_the_resolved_spec(tmp_path):
    path = _spec(tmp_path, {"shared_storage": True, "job_pip": ["raydistill==0.1.0"], "job_env_vars": {"HF_HOME": "/mnt/hf"}})
    sub = prepare_submission(path, ["train.workers=4"])

    assert sub.entrypoint.startswith(f"if command -v raydistill >/dev/null 2>&1; then exec raydistill run --spec-from-env {SPEC_ENV_VAR}; fi")
    assert sub.runtime_env["pip"] == ["raydistill==0.1.0"]
    assert "working_dir" not in sub.runtime_env
    env = sub.runtime_env["env_vars"]
    assert env["HF_HOME"] == "/mnt/hf"
    shipped = yaml.safe_load(env[SPEC_ENV_VAR])
    assert shipped["train"]["workers"] == 4  # overrides applied
    assert shipped["train"]["zero_stage"] == 2  # defaults filled in: the spec explains itself
    assert shipped["runtime"]["run_dir"] == str(tmp_path / "run")
    # The driver runs inside the cluster, so it must join it rather than start a local Ray.
    assert shipped["runtime"]["ray_address"] == "auto"
    assert sub.metadata["run_dir"] == str(tmp_path / "run")


def test_job_env_var_values_travel_only_in_the_runtime_env(tmp_path):
    from raydistill.spec import dump_spec, load_spec

    path = _spec(tmp_path, {"shared_storage": True, "job_env_vars": {"HF_TOKEN": "hf_secret_123", "AWS_REGION": "eu-west-1"}})
    sub = prepare_submission(path, [])
    assert sub.runtime_env["env_vars"]["HF_TOKEN"] == "hf_secret_123"
    shipped = sub.runtime_env["env_vars"][SPEC_ENV_VAR]
    assert "hf_secret_123" not in shipped and "eu-west-1" not in shipped
    assert sorted(yaml.safe_load(shipped)["runtime"]["job_env_vars"]) == ["AWS_REGION", "HF_TOKEN"]  # the names stay
    assert "hf_secret_123" not in dump_spec(load_spec(path))  # what RUN/spec.yaml holds


def test_an_explicit_ray_address_is_kept(tmp_path):
    sub = prepare_submission(_spec(tmp_path, {"shared_storage": True, "ray_address": "10.0.0.1:6379"}), [])
    assert yaml.safe_load(sub.spec_yaml)["runtime"]["ray_address"] == "10.0.0.1:6379"


def test_working_dir_paths_ship_relative_and_resolve_inside_it_on_the_cluster(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "c.jsonl").write_text('{"prompt": "hi"}\n')
    spec = _spec(tmp_path, {"job_working_dir": str(project), "run_dir": "/mnt/shared/runs/a", "shared_storage": True}, data_path="data/c.jsonl")
    monkeypatch.chdir(tmp_path)  # not the working dir: the path is checked inside the working dir anyway

    sub = prepare_submission(spec, [])
    assert sub.runtime_env["working_dir"] == str(project)
    assert yaml.safe_load(sub.spec_yaml)["data"]["path"] == "data/c.jsonl"

    # On the cluster the job's cwd is the uploaded copy of the working dir.
    copy = tmp_path / "uploaded"
    (copy / "data").mkdir(parents=True)
    (copy / "data" / "c.jsonl").write_text('{"prompt": "hi"}\n')
    monkeypatch.chdir(copy)
    monkeypatch.setenv(SPEC_ENV_VAR, sub.spec_yaml)
    spec_on_cluster = _run_spec(argparse.Namespace(spec=None, spec_from_env=SPEC_ENV_VAR, set=[]))
    assert spec_on_cluster.data.path == str(copy / "data" / "c.jsonl")
    assert spec_on_cluster.runtime.run_dir == "/mnt/shared/runs/a"


def test_relative_run_dir_is_resolved_where_the_user_stands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sub = prepare_submission(_spec(tmp_path, {"run_dir": "runs/x", "shared_storage": True}), [])
    assert sub.spec.runtime.run_dir == str(tmp_path / "runs" / "x")


# --------------------------------------------------------------------------- checks that matter on a cluster


def test_local_run_dir_needs_shared_storage_and_says_why(tmp_path):
    with pytest.raises(SpecError) as err:
        prepare_submission(_spec(tmp_path), [])
    lines = err.value.errors
    run_dir = next(line for line in lines if line.startswith("runtime.run_dir:"))
    assert repr(str(tmp_path / "run")) in run_dir
    assert "other nodes write signals and checkpoints there" in run_dir
    assert "runtime.shared_storage=true" in run_dir
    assert any(line.startswith("data.path:") for line in lines)  # the corpus too, in the same report


def test_shared_storage_or_uris_satisfy_the_check(tmp_path):
    prepare_submission(_spec(tmp_path, {"shared_storage": True}), [])
    prepare_submission(_spec(tmp_path, {"shared_storage": True}, data_path="s3://bucket/corpus.jsonl"), [])


def test_object_store_run_dirs_are_refused_with_the_reason(tmp_path):
    with pytest.raises(SpecError) as err:
        prepare_submission(_spec(tmp_path, {"run_dir": "gs://bucket/run"}, data_path="s3://bucket/corpus.jsonl"), [])
    line = next(line for line in err.value.errors if line.startswith("runtime.run_dir:"))
    assert "object-store URI" in line and "runtime.shared_storage=true" in line


def test_shared_paths_this_machine_cannot_see_are_left_to_the_cluster(tmp_path):
    # A laptop submitting to KubeRay has no /mnt/shared; the job's `raydistill run` checks these there.
    spec = _spec(tmp_path, {"shared_storage": True, "run_dir": "/mnt/shared/runs/a"}, data_path="/mnt/shared/data/c.jsonl")
    sub = prepare_submission(spec, ["teacher.model=/mnt/shared/models/teacher"])
    shipped = yaml.safe_load(sub.spec_yaml)
    assert shipped["data"]["path"] == "/mnt/shared/data/c.jsonl"
    assert shipped["teacher"]["model"] == "/mnt/shared/models/teacher"
    assert sub.spec.teacher.model == "/mnt/shared/models/teacher"
    assert sorted(n.split(":")[0] for n in sub.notes) == ["data.path", "teacher.model"]

    with pytest.raises(SpecError) as err:  # without shared storage they are simply wrong
        prepare_submission(_spec(tmp_path, {"run_dir": "/mnt/shared/runs/b"}, data_path="/mnt/shared/data/c.jsonl"), [])
    assert any(line.startswith("data.path:") and "does not exist" in line for line in err.value.errors)


def test_every_problem_is_reported_at_once(tmp_path):
    spec = _spec(tmp_path, {"job_working_dir": str(tmp_path / "missing"), "job_env_vars": {"TOKENIZERS_PARALLELISM": "true"}})
    with pytest.raises(SpecError) as err:
        prepare_submission(spec, ["train.zero_stage=4"])
    text = "\n".join(err.value.errors)
    assert "runtime.job_working_dir: " in text and "is not a directory" in text
    assert "train.zero_stage: 4" in text
    assert "runtime.job_env_vars.TOKENIZERS_PARALLELISM" in text  # Ray would refuse to merge it with the driver's


def test_run_takes_exactly_one_spec_source(capsys):
    assert main(["run"]) == 2
    assert "give either a SPEC file or --spec-from-env" in capsys.readouterr().err


def test_run_reports_an_unset_spec_variable(monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_SPEC", raising=False)
    assert main(["run", "--spec-from-env", "NO_SUCH_SPEC"]) == 2
    assert "--spec-from-env NO_SUCH_SPEC: the environment variable is not set" in capsys.readouterr().err


# --------------------------------------------------------------------------- the auth token


def test_token_precedence_follows_ray(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-file\n")
    token_file = tmp_path / "tok"
    token_file.write_text("from-path")

    assert find_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(token_file)}, home) == AuthToken("from-env", "RAY_AUTH_TOKEN")
    assert find_auth_token({"RAY_AUTH_TOKEN_PATH": str(token_file)}, home).value == "from-path"
    assert find_auth_token({"RAY_AUTH_TOKEN": "  "}, home) == AuthToken("from-file", str(home / ".ray" / "auth_token"))
    assert find_auth_token({}, tmp_path / "nobody") is None


def test_unreadable_token_path_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH=.*cannot be read"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "absent")}, tmp_path)


def test_auth_header_is_sent_unless_auth_is_disabled():
    token = AuthToken("abc", "RAY_AUTH_TOKEN")
    assert auth_headers(token, {}) == {"Authorization": "Bearer abc"}
    assert auth_headers(token, {"RAY_AUTH_MODE": "disabled"}) == {}
    assert auth_headers(None, {}) == {}


def test_auth_errors_say_how_to_fix_them():
    missing = auth_error_message("http://head:8265", None, {})
    assert "requires token authentication" in missing and "no token was found" in missing
    assert "ray get-auth-token" in missing and "RAY_AUTH_TOKEN" in missing and "~/.ray/auth_token" in missing
    wrong = auth_error_message("http://head:8265", AuthToken("x", "/home/u/.ray/auth_token"), {})
    assert "rejected the authentication token from /home/u/.ray/auth_token" in wrong


def test_explain_cluster_errors_turns_the_sdk_errors_into_messages():
    from ray.exceptions import AuthenticationError

    from raydistill.jobs.submit import explain_cluster_errors

    with pytest.raises(ClusterError, match="requires token authentication"):
        with explain_cluster_errors("http://head:8265", None):
            raise AuthenticationError("Authentication required: Unauthorized: Missing authentication token")
    with pytest.raises(ClusterError, match="cannot reach the Ray dashboard at http://head:8265"):
        with explain_cluster_errors("http://head:8265", None):
            raise ConnectionError("refused")


# --------------------------------------------------------------------------- the command line


def test_cluster_commands_parse(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    parser = build_parser()
    args = parser.parse_args(["submit", "s.yaml", "--address", "http://h:8265", "--set", "train.workers=1", "--follow"])
    assert (args.spec, args.address, args.set, args.follow) == ("s.yaml", "http://h:8265", ["train.workers=1"], True)
    assert parser.parse_args(["status", "raysubmit_1"]).address == "http://127.0.0.1:8265"
    assert parser.parse_args(["logs", "raysubmit_1", "--follow"]).follow
    assert parser.parse_args(["stop", "raysubmit_1", "--timeout", "5"]).timeout == 5.0
    assert parser.parse_args(["list"]).func.__name__ == "cmd_list"
    run = parser.parse_args(["run", "--spec-from-env", SPEC_ENV_VAR])
    assert run.spec is None and run.spec_from_env == SPEC_ENV_VAR


def test_address_defaults_to_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert default_address() == "http://head:8265"
    assert build_parser().parse_args(["list"]).address == "http://head:8265"
    assert default_address({}) == "http://127.0.0.1:8265"


def test_job_table_lists_submitted_jobs_newest_first():
    status = SimpleNamespace
    jobs = [
        SimpleNamespace(submission_id="raysubmit_old", status=status(value="SUCCEEDED"), start_time=1_000, metadata={"run_dir": "/runs/a"}, entrypoint="x"),
        SimpleNamespace(submission_id=None, status=status(value="RUNNING"), start_time=3_000, metadata={}, entrypoint="a driver"),
        SimpleNamespace(submission_id="raysubmit_new", status=status(value="RUNNING"), start_time=2_000, metadata=None, entrypoint="python x.py"),
    ]
    lines = format_job_table(jobs).splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("raysubmit_new") and lines[1].endswith("python x.py")
    assert lines[2].startswith("raysubmit_old") and "SUCCEEDED" in lines[2] and lines[2].endswith("/runs/a")


def test_spec_errors_from_submit_print_like_validate(tmp_path, capsys):
    # An address off this machine: its nodes cannot read this machine's paths.
    assert main(["submit", str(_spec(tmp_path)), "--address", "http://192.0.2.1:1"]) == 2
    err = capsys.readouterr().err
    assert "error: the job spec has 2 problem(s):" in err and "  runtime.run_dir: " in err


def test_remote_code_consent_travels_as_the_jobs_own_flag(tmp_path):
    from raydistill.engine_args import remote_code_consent

    path = _spec(tmp_path, {"shared_storage": True})
    with pytest.raises(SpecError, match="--trust-remote-code"):
        prepare_submission(path, ["teacher.engine_args.trust_remote_code=true"])
    with remote_code_consent(True):
        sub = prepare_submission(path, ["teacher.engine_args.trust_remote_code=true"])
    assert sub.entrypoint.count(f"run --spec-from-env {SPEC_ENV_VAR} --trust-remote-code") == 2  # on PATH, or in the cluster's Python
    plain = prepare_submission(path, []).entrypoint
    assert plain.count(f"run --spec-from-env {SPEC_ENV_VAR}") == 2 and "--trust-remote-code" not in plain
    assert build_parser().parse_args(["submit", "s.yaml", "--trust-remote-code"]).trust_remote_code


def test_the_working_dir_upload_leaves_out_venvs_runs_git_and_caches(tmp_path):
    from raydistill.spec import DEFAULT_JOB_EXCLUDES

    work = tmp_path / "work"
    work.mkdir()
    sub = prepare_submission(_spec(tmp_path, {"shared_storage": True, "job_working_dir": str(work)}), [])
    assert sub.runtime_env["working_dir"] == str(work)
    assert sub.runtime_env["excludes"] == list(DEFAULT_JOB_EXCLUDES)
    assert {".venv/", "runs/", ".git/", ".cache/"} <= set(DEFAULT_JOB_EXCLUDES)
    sub = prepare_submission(_spec(tmp_path, {"shared_storage": True, "job_working_dir": str(work), "job_excludes": ["data/"]}), [])
    assert sub.runtime_env["excludes"] == ["data/"]
    # A zip URI is uploaded as it is: excludes do not apply.
    sub = prepare_submission(_spec(tmp_path, {"shared_storage": True, "job_working_dir": "s3://b/code.zip"}), [])
    assert "excludes" not in sub.runtime_env


def test_an_oversize_working_dir_is_refused_with_the_reason(tmp_path):
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "big.jsonl").write_bytes(b"x" * (3 * 1024 * 1024))
    (work / ".venv").mkdir()
    (work / ".venv" / "huge.so").write_bytes(b"x" * (5 * 1024 * 1024))  # excluded: does not count
    (work / "train.py").write_text("print('hi')\n")
    runtime = {"shared_storage": True, "job_working_dir": str(work), "job_working_dir_max_mib": 2}
    with pytest.raises(SpecError) as err:
        prepare_submission(_spec(tmp_path, runtime), [])
    (line,) = [e for e in err.value.errors if e.startswith("runtime.job_working_dir:")]
    assert "more than 2 MiB" in line and "data/ 3 MiB" in line and ".venv" not in line and "runtime.job_excludes" in line
    runtime["job_excludes"] = [".venv/", "data/"]  # the list replaces the defaults
    assert prepare_submission(_spec(tmp_path, runtime), []).runtime_env["excludes"] == [".venv/", "data/"]


def test_a_token_bound_for_a_remote_http_address_is_warned_about():
    from raydistill.jobs.submit import token_exposure_warning

    token = AuthToken("t0k", "RAY_AUTH_TOKEN")
    warning = token_exposure_warning("http://10.0.0.5:8265", token, {})
    assert warning and "cleartext" in warning and "RAY_AUTH_TOKEN" in warning and "t0k" not in warning
    assert token_exposure_warning("head.example.com:8265", token, {})  # no scheme: Ray uses http://
    for quiet in ("http://127.0.0.1:8265", "http://localhost:8265", "https://head.example.com", "http://[::1]:8265"):
        assert token_exposure_warning(quiet, token, {}) is None, quiet
    assert token_exposure_warning("http://10.0.0.5:8265", None, {}) is None
    assert token_exposure_warning("http://10.0.0.5:8265", token, {"RAY_AUTH_MODE": "disabled"}) is None


def test_connect_prints_the_warning(monkeypatch, capsys):
    import ray.job_submission

    from raydistill.jobs import submit as jobs

    monkeypatch.setattr(jobs, "find_auth_token", lambda: AuthToken("t0k", "RAY_AUTH_TOKEN"))
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address, headers: SimpleNamespace(address=address))
    jobs.connect("http://10.0.0.5:8265")
    err = capsys.readouterr().err
    assert "warning: the Ray auth token" in err and "t0k" not in err


def _run_entrypoint_under(worker_command: str, env_path: str):
    """The job's entrypoint as Ray's job supervisor runs it: a shell whose ancestor is a raylet started with ``worker_command``."""
    import subprocess
    import sys

    from raydistill.jobs.submit import build_entrypoint

    raylet = "import subprocess, sys; sys.exit(subprocess.run(['sh', '-c', sys.argv[1]]).returncode)"
    env = {"PATH": env_path, "HOME": str(Path.home())}
    return subprocess.run([sys.executable, "-c", raylet, build_entrypoint(), f"--python_worker_command={worker_command} /ray/default_worker.py"],
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_entrypoint_runs_raydistill_in_the_clusters_python_when_it_is_not_on_path():
    """A head started as `.venv/bin/ray start --head` without the venv on PATH: the job still finds raydistill."""
    import sys

    proc = _run_entrypoint_under(sys.executable, "/usr/bin:/bin")
    # raydistill itself ran (in the cluster's Python) and answered: the job's spec variable is not set in this test.
    assert proc.returncode == 2 and f"--spec-from-env {SPEC_ENV_VAR}: the environment variable is not set" in proc.stderr, proc.stderr


def test_the_entrypoint_says_when_the_clusters_python_lacks_raydistill(tmp_path):
    bare = tmp_path / "python"  # a Python without raydistill: the interpreter with no site-packages of ours
    bare.write_text("#!/bin/sh\nexec /usr/bin/env -i /bin/sh -c 'exit 1'\n")
    bare.chmod(0o755)
    proc = _run_entrypoint_under(str(bare), "/usr/bin:/bin")
    assert proc.returncode == 1 and f"raydistill is not installed in the cluster's Python ({bare})" in proc.stderr, proc.stderr


def test_a_loopback_address_accepts_local_paths_and_says_so(tmp_path):
    """Submitting to a head on this machine: local run_dir and corpus are readable by every node, no shared_storage needed."""
    spec = _spec(tmp_path)
    with pytest.raises(SpecError, match="runtime.run_dir"):
        prepare_submission(spec, [], "http://10.1.2.3:8265")
    for address in ("http://127.0.0.1:8265", "localhost:8265"):
        sub = prepare_submission(spec, [], address)
        assert sub.spec.runtime.shared_storage is True
        assert any(n.startswith(f"{address} is this machine") for n in sub.notes)
    # A local path that does not exist is an error at once: this machine is the cluster.
    with pytest.raises(SpecError, match="data.path"):
        prepare_submission(spec, [f"data.path={tmp_path / 'missing.jsonl'}"], "http://127.0.0.1:8265")


def test_several_teachers_local_models_are_named_for_a_cluster(tmp_path):
    from raydistill.jobs.submit import cluster_errors
    from raydistill.spec import spec_from_dict

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    local = tmp_path / "my-teacher"
    local.mkdir()
    spec = spec_from_dict({"teachers": [{"name": "a", "model": "tiny:teacher"}, {"name": "b", "model": str(local)}],
                           "student": {"model": "s3://bucket/student"}, "data": {"path": "s3://bucket/c.jsonl"},
                           "teacher_pass": {"routing": "ensemble"}, "runtime": {"run_dir": str(tmp_path / "run")}})
    errors = cluster_errors(spec, set())
    assert [e.split(":")[0] for e in errors] == ["runtime.run_dir", "teachers[1].model"]  # the builtin tiny:teacher is built on the node
