"""MLflow tracking without Ray: the spec keys, the params, the local store, continuing a run, and failures that stay warnings."""

import json
import socket
import time

import pytest
import yaml

from raydistill.jobs import tracking as t
from raydistill.jobs.pipeline import plan
from raydistill.jobs.rundir import RunDir
from raydistill.jobs.stages import StageContext
from raydistill.spec import JobSpec, SpecError, dump_spec, spec_from_dict


@pytest.fixture
def raw(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    return {"teacher": {"model": "tiny:teacher"}, "student": {"model": "tiny:student"}, "data": {"path": str(corpus)},
            "train": {"max_steps": 3}, "runtime": {"run_dir": str(tmp_path / "run")}}


def _with(raw, **tracking):
    return spec_from_dict({**json.loads(json.dumps(raw)), "tracking": tracking})


# --------------------------------------------------------------------------- the spec


def test_tracking_is_off_by_default_and_on_with_an_experiment_or_true(raw, tmp_path):
    assert spec_from_dict(json.loads(json.dumps(raw))).tracking.mlflow is None
    on = _with(raw, mlflow={"experiment": "kd"}).tracking.mlflow
    assert on.experiment == "kd" and on.tracking_uri is None
    assert _with(raw, mlflow=True).tracking.mlflow.experiment == "raydistill"
    assert _with(raw, mlflow=False).tracking.mlflow is None
    # The local store of an unset URI is under the run directory, absolute (train workers log from elsewhere).
    run = RunDir.of(tmp_path / "run")
    assert t.store_uri(on, run) == (tmp_path / "run" / "mlruns").resolve().as_uri()
    assert t.store_uri(on, run).startswith("file:///")


def test_a_relative_store_is_made_absolute_and_servers_are_kept(raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = lambda v: _with(raw, mlflow={"tracking_uri": v}).tracking.mlflow.tracking_uri  # noqa: E731
    assert uri("mlruns") == uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    assert uri("http://mlflow:5000") == "http://mlflow:5000" and uri("databricks") == "databricks"
    assert uri("file:///abs/store") == "file:///abs/store" and uri("") is None


def test_tracking_errors_name_their_keys(raw):
    with pytest.raises(SpecError) as err:
        _with(raw, mlflow={"experiment": "", "uri": "x"})
    assert set(err.value.errors) == {"tracking.mlflow.experiment: '' is invalid: String should have at least 1 character",
                                     "tracking.mlflow.uri: unknown key (value 'x')"}


def test_the_spec_with_tracking_round_trips(raw):
    spec = _with(raw, mlflow={"experiment": "kd", "tracking_uri": "http://mlflow:5000"})
    assert JobSpec.model_validate(yaml.safe_load(dump_spec(spec))) == spec


def test_tracking_changes_no_fingerprint_and_reruns_nothing(raw, tmp_path):
    def steps(spec, manifest):
        return {s.stage.name: s for s in plan(spec, manifest, StageContext(spec, RunDir.of(spec.runtime.run_dir), "tiny:teacher", "tiny:student"))}

    off = steps(spec_from_dict(json.loads(json.dumps(raw))), {"stages": {}})
    on = steps(_with(raw, mlflow={"experiment": "kd", "tracking_uri": "http://mlflow:5000"}), {"stages": {}})
    assert {n: s.fingerprint for n, s in on.items()} == {n: s.fingerprint for n, s in off.items()}
    assert all(not any(k.startswith("tracking") for k in s.inputs) for s in on.values())
    done = {"stages": {n: {"status": "succeeded", "fingerprint": s.fingerprint, "inputs": s.inputs, "output_id": s.output_id, "runs": 1}
                       for n, s in off.items()}}
    assert {s.action for s in steps(_with(raw, mlflow={}), done).values()} == {"skip"}


# --------------------------------------------------------------------------- params and metrics


def test_params_are_the_flattened_spec():
    params = t.flatten_params({"train": {"lr": 0.001, "max_steps": None, "use_gpu": False, "deepspeed_overrides": {}},
                               "teachers": [{"name": "a", "engine_args": {"dtype": "float32"}}], "data": {"path": "/c.jsonl"},
                               "serve": {"extra_routes": ["score", "tokenize"]}, "note": "x" * 7000})
    assert params == {"train.lr": "0.001", "train.max_steps": "null", "train.use_gpu": "false", "train.deepspeed_overrides": "{}",
                      "teachers.0.name": "a", "teachers.0.engine_args.dtype": "float32", "data.path": "/c.jsonl",
                      "serve.extra_routes": '["score", "tokenize"]', "note": "x" * t.PARAM_VALUE_MAX}


def test_params_go_in_batches_of_mlflows_limit():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    assert (t.PARAMS_PER_BATCH, t.PARAM_VALUE_MAX) == (MAX_PARAMS_TAGS_PER_BATCH, MAX_PARAM_VAL_LENGTH)
    assert [len(b) for b in t.batches(list(range(250)), t.PARAMS_PER_BATCH)] == [100, 100, 50]
    assert t.batches([], 100) == []


def test_metrics_are_the_numbers_of_a_record():
    record = {"step": 3, "loss": 1.5, "tokens": 96, "lr": 1e-3, "grad_norm": None, "rollouts": 0, "policy_version": None, "flag": True}
    assert t.step_metrics(record) == {"train/loss": 1.5, "train/tokens": 96.0, "train/lr": 1e-3, "train/rollouts": 0.0}
    report = {"student": {"nll": 2.0, "parameters": 10}, "kl_to_teacher": 0.5, "side_by_side": [{"a": 1}], "student_dir": "/s",
              "loss_curve": True, "by_domain": {"code:py": {"kl_to_teacher": float("inf")}}}
    assert t.numeric_leaves(report, "eval") == {"eval.student.nll": 2.0, "eval.student.parameters": 10.0, "eval.kl_to_teacher": 0.5}


# --------------------------------------------------------------------------- the local store


def _spec_yaml(spec):
    run = RunDir.of(spec.runtime.run_dir)
    run.root.mkdir(parents=True, exist_ok=True)
    run.spec.write_text(dump_spec(spec))
    run.manifest.write_text('{"stages": {}}')  # as the pipeline leaves it before tracking starts
    return run


def test_a_run_starts_in_the_local_store_and_a_rerun_continues_it(raw, capsys):
    spec = _with(raw, mlflow={"experiment": "unit"})
    run = _spec_yaml(spec)
    first = t.start(spec, run)
    assert first.new and first.tracking_uri == run.mlruns.resolve().as_uri() and run.mlruns.is_dir()
    state = json.loads(run.mlflow_run.read_text())
    assert state["run_id"] == first.run_id and state["experiment"] == "unit"
    c = t.client(first.tracking_uri)
    got = c.get_run(first.run_id)
    assert got.data.params["train.max_steps"] == "3" and got.data.params["tracking.mlflow.experiment"] == "unit"
    assert got.data.params == t.flatten_params(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert got.data.tags[t.TAG_RUN_DIR] == str(run.root.resolve())
    assert [a.path for a in c.list_artifacts(first.run_id)] == ["spec.yaml"]
    first.finish("FINISHED")

    again = t.start(spec, run)  # the same spec: the same MLflow run, running again
    assert again.run_id == first.run_id and not again.new
    assert c.get_run(first.run_id).info.status == "RUNNING"
    out = capsys.readouterr().out
    assert f"==> tracking: MLflow run {first.run_id} in experiment 'unit'" in out and "continuing" in out

    changed = _with({**raw, "train": {"max_steps": 4}}, mlflow={"experiment": "unit"})
    other = t.start(changed, run)  # MLflow's params cannot change: another spec is another MLflow run
    assert other.new and other.run_id != first.run_id
    assert "the spec changed since MLflow run" in capsys.readouterr().out and "train.max_steps" in json.dumps(c.get_run(other.run_id).data.params)
    assert json.loads(run.mlflow_run.read_text())["run_id"] == other.run_id


def test_steps_eval_and_the_student_are_logged(raw, tmp_path):
    spec = _with(raw, mlflow=True)
    run = _spec_yaml(spec)
    tracked = t.start(spec, run)
    log = t.StepLogger(tracked)
    for step in (1, 2, 3):
        log.step({"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": None})
    run.eval.mkdir()
    (run.eval / "report.json").write_text(json.dumps({"student": {"nll": 2.5}, "kl_to_teacher": 0.25, "student_dir": "/s"}))
    (run.eval / "report.md").write_text("# report\n")
    tracked.log_eval(run)
    tracked.set_student(run.student)
    assert tracked.log_history([{"step": 1, "loss": 9.0}, {"event": "resumed_from"}], prefix="replayed/") == 1

    c = t.client(tracked.tracking_uri)
    history = c.get_metric_history(tracked.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    data = c.get_run(tracked.run_id).data
    assert data.metrics["eval.kl_to_teacher"] == 0.25 and data.metrics["eval.student.nll"] == 2.5 and data.metrics["replayed/loss"] == 9.0
    assert "train/grad_norm" not in data.metrics
    assert data.tags[t.TAG_STUDENT] == str(run.student.resolve())
    assert sorted(a.path for a in c.list_artifacts(tracked.run_id, "eval")) == ["eval/report.json", "eval/report.md"]


def test_a_failing_step_log_warns_once_and_training_goes_on(raw, capsys):
    spec = _with(raw, mlflow=True)
    tracked = t.start(spec, _spec_yaml(spec))
    log = t.StepLogger(t.TrackedRun(tracked.tracking_uri, "0" * 32))  # no such run
    log.step({"step": 1, "loss": 1.0})
    log.step({"step": 2, "loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("warning: MLflow: could not log step 1") == 1 and "the training goes on" in err and log.failed


def test_an_unreachable_server_fails_at_the_start_in_seconds(raw):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    spec = _with(raw, mlflow={"tracking_uri": f"http://127.0.0.1:{port}"})
    start = time.monotonic()
    with pytest.raises(t.TrackingError) as err:
        t.start(spec, _spec_yaml(spec))
    assert time.monotonic() - start < 60
    assert str(err.value).startswith(f"tracking.mlflow: cannot log to http://127.0.0.1:{port} (experiment 'raydistill'): ")
    assert not RunDir.of(spec.runtime.run_dir).mlflow_run.exists()


def test_a_stage_whose_results_cannot_be_logged_still_succeeds(raw, capsys):
    from raydistill.jobs.pipeline import _track
    from raydistill.jobs.stages import Stage

    def boom(ctx, tracked, replay):
        raise OSError("store is read-only")

    spec = _with(raw, mlflow=True)
    ctx = StageContext(spec, RunDir.of(spec.runtime.run_dir), "tiny:teacher", "tiny:student", tracking=t.TrackedRun("file:///x", "abc"))
    _track(Stage("eval", lambda ctx: {}, reads=(), track=boom), ctx, replay=False)
    assert "warning: MLflow: could not log the eval stage's results to MLflow run abc: OSError: store is read-only" in capsys.readouterr().err


def test_a_new_mlflow_run_gets_the_results_of_the_stages_a_rerun_skips(raw, capsys):
    """Turning tracking on for a finished run directory runs no stage; its training steps and report go into the new MLflow run."""
    from raydistill.jobs.manifest import Manifest
    from raydistill.jobs.pipeline import _run_plan

    spec = _with(raw, mlflow={"experiment": "replay"})
    run = RunDir.of(spec.runtime.run_dir)
    ctx = StageContext(spec, run, "tiny:teacher", "tiny:student")
    done = {"stages": {s.stage.name: {"status": "succeeded", "fingerprint": s.fingerprint, "inputs": s.inputs, "output_id": s.output_id,
                                      "runs": 1} for s in plan(spec, {"stages": {}}, ctx)}}
    for d in (run.train, run.student, run.eval):
        d.mkdir(parents=True)
    run.manifest.write_text(json.dumps(done))
    (run.train / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3}) + "\n" for s in (1, 2, 3)))
    (run.eval / "report.json").write_text(json.dumps({"kl_to_teacher": 0.5, "student": {"nll": 3.0}}))
    (run.eval / "report.md").write_text("# report\n")
    steps = plan(spec, done, ctx)
    assert {s.action for s in steps} == {"skip"}

    _run_plan(spec, steps, ctx, Manifest(run.root), None)
    state = json.loads(run.mlflow_run.read_text())
    c = t.client(state["tracking_uri"])
    got = c.get_run(state["run_id"])
    assert got.info.status == "FINISHED" and got.data.tags[t.TAG_STUDENT] == str(run.student.resolve())
    assert [m.step for m in sorted(c.get_metric_history(state["run_id"], "train/loss"), key=lambda m: m.step)] == [1, 2, 3]
    assert got.data.metrics["eval.kl_to_teacher"] == 0.5 and got.data.metrics["eval.student.nll"] == 3.0
    assert {a.path for a in c.list_artifacts(state["run_id"], "eval")} == {"eval/report.json", "eval/report.md"}

    _run_plan(spec, steps, ctx, Manifest(run.root), None)  # the same spec again: the same MLflow run, nothing logged twice
    assert json.loads(run.mlflow_run.read_text())["run_id"] == state["run_id"]
    assert len(c.get_metric_history(state["run_id"], "train/loss")) == 3
    assert "warning" not in capsys.readouterr().err
