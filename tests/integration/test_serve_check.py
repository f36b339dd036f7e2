"""The pipeline's serve-check on a cluster where another Serve application already answers."""

import json
import os
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return json.loads(resp.read())


def test_serve_check_leaves_another_app_answering(ray_local, model_paths, tiny_spec, free_port):
    from ray import serve

    from raydistill.serving.app import serve_check

    @serve.deployment
    class Someone:
        def __call__(self, request) -> dict:
            return {"pid": os.getpid()}

    serve.start(http_options={"host": "127.0.0.1", "port": free_port})
    try:
        serve.run(Someone.bind(), name="someone-else", route_prefix="/")
        before = _get(f"http://127.0.0.1:{free_port}/")
        # The spec asks for another port: Serve already runs here, so the check uses the running proxy.
        spec = tiny_spec.serve.model_copy(update={"engine_args": {"max_model_len": 512, "enforce_eager": True}})
        out = serve_check(model_paths[1], "tiny-student", spec, "hi")

        assert out["url"] == f"http://127.0.0.1:{free_port}/{out['app']}/v1/completions" and out["app"].startswith("raydistill-check-")
        assert out["usage"]["completion_tokens"] >= 1
        apps = serve.status().applications
        assert out["app"] not in apps and apps["someone-else"].status == "RUNNING"
        assert _get(f"http://127.0.0.1:{free_port}/") == before  # still answering, from the same replica
    finally:
        serve.shutdown()  # this test's own Serve instance
