"""Shared, expensive fixtures: one local Ray and the tiny models per test session."""

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def model_paths(tiny_spec):
    from raydistill.models import resolve_model

    return resolve_model(tiny_spec.teacher.model), resolve_model(tiny_spec.student.model)


@pytest.fixture(scope="session")
def teacher_run(tiny_run):
    """The teacher stage's outputs in the shared tiny run."""
    return tiny_run[2]["stages"]["teacher"]["outputs"]


@pytest.fixture(scope="session")
def train_run(tiny_run):
    """The train stage's outputs in the shared tiny run."""
    return tiny_run[2]["stages"]["train"]["outputs"]
