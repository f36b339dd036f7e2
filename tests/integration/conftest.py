"""Shared, expensive fixtures: one local Ray and one run of each stage per test session."""

from pathlib import Path

import pytest

from raydistill.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_spec(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    return load_spec(ROOT / "configs" / "tiny.yaml", [f"runtime.run_dir={run_dir}", f"data.path={ROOT / 'configs/data/tiny_prompts.jsonl'}",
                                                      "eval.measure_speed=true", "eval.side_by_side=2", "eval.speed_prompts=4"])


@pytest.fixture(scope="session")
def model_paths(tiny_spec):
    from raydistill.models import resolve_model

    return resolve_model(tiny_spec.teacher.model), resolve_model(tiny_spec.student.model)


@pytest.fixture(scope="session")
def teacher_run(ray_local, tiny_spec, model_paths):
    from raydistill.teacher.stage import run_teacher_stage

    signals_dir = str(Path(tiny_spec.runtime.run_dir) / "signals")
    out = run_teacher_stage(tiny_spec.data, tiny_spec.teacher, tiny_spec.teacher_pass, model_paths[0], signals_dir)
    return out


@pytest.fixture(scope="session")
def train_run(ray_local, tiny_spec, model_paths, teacher_run):
    from raydistill.distill.train import run_train_stage

    train = tiny_spec.train.model_copy(update={"max_steps": 6})
    return run_train_stage(train, tiny_spec.distill, model_paths[1], teacher_run["signals_dir"], tiny_spec.runtime.run_dir)
