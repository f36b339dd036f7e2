import os
import socket

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_model_cache(tmp_path_factory):
    """Builtin tiny models are built once per test session into a private cache."""
    os.environ["RAYDISTILL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    yield


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that nothing is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
