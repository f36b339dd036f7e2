"""The pipeline's plan without Ray: which stages a re-run executes, and why, from the recorded fingerprints."""

import json
import os
from pathlib import Path

import pytest

from raydistill.jobs.pipeline import plan, run_lock, RunDirBusy
from raydistill.jobs.rundir import RunDir
from raydistill.jobs.stages import StageContext
from raydistill.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def world(tmp_path):
    """A spec over a corpus and two model directories of its own, so the test can change any of them."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "hi"}\n{"prompt": "the river"}\n')
    models = {}
    for name in ("teacher", "student"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"name": name}))
        (d / "tokenizer.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"weights")
        models[name] = str(d)
    raw = {"teacher": {"model": models["teacher"]}, "student": {"model": models["student"]}, "data": {"path": str(corpus)},
           "runtime": {"run_dir": str(tmp_path / "run")}}
    return raw, models, corpus


def _spec(raw, **changes):
    import copy

    raw = copy.deepcopy(raw)
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec_from_dict(raw)


def _plan(raw, models, manifest, selected=None, force=(), **changes):
    spec = _spec(raw, **changes)
    ctx = StageContext(spec, RunDir.of(spec.runtime.run_dir), models["teacher"], models["student"])
    return {s.stage.name: s for s in plan(spec, manifest, ctx, selected, force)}


def _succeed(manifest, steps):
    """What the pipeline records when the planned stages succeed."""
    for s in steps.values():
        if s.action == "run":
            prev = manifest["stages"].get(s.stage.name, {})
            manifest["stages"][s.stage.name] = {"status": "succeeded", "fingerprint": s.fingerprint, "inputs": s.inputs,
                                                "output_id": s.output_id, "runs": prev.get("runs", 0) + 1}
    return manifest


def _actions(steps):
    return {n: s.action for n, s in steps.items()}


@pytest.fixture
def done(world):
    raw, models, _ = world
    return _succeed({"stages": {}}, _plan(raw, models, {"stages": {}}))


def test_a_new_run_runs_everything(world):
    raw, models, _ = world
    steps = _plan(raw, models, {"stages": {}})
    assert _actions(steps) == dict.fromkeys(("teacher", "train", "eval", "serve-check"), "run")
    assert all(s.reason == "never ran" for s in steps.values())


def test_an_unchanged_rerun_skips_everything(world, done):
    raw, models, _ = world
    assert set(_actions(_plan(raw, models, done)).values()) == {"skip"}


def test_changing_the_learning_rate_reruns_train_and_what_reads_it(world, done):
    raw, models, _ = world
    steps = _plan(raw, models, done, train__lr=1e-4)
    assert _actions(steps) == {"teacher": "skip", "train": "run", "eval": "run", "serve-check": "run"}
    assert steps["train"].reason == "inputs changed: train.lr"
    assert steps["eval"].reason == "inputs changed: upstream:train"
    assert steps["train"].fields["train.lr"] == 1e-4


@pytest.mark.parametrize("change", [{"teacher_pass__top_k": 16}, {"data__eval_fraction": 0.2}, {"teacher__engine_args": {"max_model_len": 256}}])
def test_teacher_inputs_rerun_everything(world, done, change):
    raw, models, _ = world
    assert set(_actions(_plan(raw, models, done, **change)).values()) == {"run"}


def test_a_changed_corpus_file_reruns_everything(world, done):
    raw, models, corpus = world
    corpus.write_text('{"prompt": "another corpus"}\n')
    steps = _plan(raw, models, done)
    assert steps["teacher"].reason == "inputs changed: corpus" and set(_actions(steps).values()) == {"run"}


def test_changed_model_files_are_noticed(world, done):
    raw, models, _ = world
    (Path(models["student"]) / "tokenizer.json").write_text('{"changed": true}')
    steps = _plan(raw, models, done)
    assert steps["teacher"].action == "skip" and steps["train"].reason == "inputs changed: model:student"


@pytest.mark.parametrize("change", [{"train__checkpoint_every": 7}, {"train__max_failures": 0}, {"serve__port": 8123},
                                    {"teacher__replicas": 3}, {"teacher__batch_size": 4}, {"eval__num_cpus": 2}, {"teacher_pass__shard_rows": 9}])
def test_how_a_stage_runs_is_not_an_input(world, done, change):
    raw, models, _ = world
    assert set(_actions(_plan(raw, models, done, **change)).values()) == {"skip"}


def test_force_reruns_a_stage_and_what_reads_it(world, done):
    raw, models, _ = world
    steps = _plan(raw, models, done, force=("train",))
    assert _actions(steps) == {"teacher": "skip", "train": "run", "eval": "run", "serve-check": "run"}
    assert steps["train"].reason == "forced" and steps["train"].output_id.endswith(":2")


def test_unselected_stages_with_changed_inputs_are_stale(world, done):
    raw, models, _ = world
    steps = _plan(raw, models, done, selected=["teacher"], train__lr=1e-4)
    assert _actions(steps) == {"teacher": "skip", "train": "stale", "eval": "stale", "serve-check": "stale"}


def test_an_interrupted_stage_resumes_with_unchanged_inputs(world, done):
    raw, models, _ = world
    done["stages"]["train"]["status"] = "failed"
    steps = _plan(raw, models, done)
    assert steps["train"].action == "run" and steps["train"].reason == "resuming an attempt that is failed"
    assert steps["teacher"].action == "skip"


def test_disabled_eval(world, done):
    raw, models, _ = world
    assert _plan(raw, models, done, eval__enabled=False)["eval"].action == "disabled"


def test_a_second_run_on_a_busy_directory_fails_at_once(tmp_path, run_lock_holder):
    import time

    run = RunDir.of(tmp_path)
    holder = run_lock_holder(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(RunDirBusy, match=f"in use by another raydistill run \\(pid {holder.pid} "):
        with run_lock(run):
            pass
    assert time.monotonic() - t0 < 5
    holder.kill()
    holder.wait()
    with run_lock(run):  # the holder died: the OS released its lock
        assert (tmp_path / ".lock.holder").read_text().startswith(f"pid {os.getpid()} ")
