"""The recipes in cluster/, checked offline: schema, structure, and that they run raydistill."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from raydistill.spec import JobSpec, RuntimeSpec

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
IMAGE_BUILT_BY_DOCKERFILE = "registry.example.com/raydistill:0.1.0"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def _cluster_spec(name: str) -> dict:
    doc = next(d for d in _docs(name) if d["apiVersion"] == "ray.io/v1")
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"], "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def _pod_specs(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


def _mounts(pod: dict) -> dict[str, str]:
    """mountPath -> volume name, for the pod's first container."""
    return {m["mountPath"]: m["name"] for m in pod["containers"][0].get("volumeMounts", [])}


# --------------------------------------------------------------------------- cluster launcher


def test_launcher_config_validates_against_rays_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(config)  # Ray's own checks on top: head type exists, min_workers fit max_workers


def test_launcher_config_has_an_autoscaled_gpu_worker_and_installs_raydistill():
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if re.match(r"^(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu, "no GPU instance type among the worker node types"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert "cu" in config["docker"]["image"].split(":")[-1]  # a CUDA image
    assert any("raydistill[gpu]" in cmd and "pip install" in cmd for cmd in config["setup_commands"])
    mounted_repo = [local for remote, local in config["file_mounts"].items() if remote.endswith("/raydistill")]
    assert mounted_repo == ["."]  # `ray up` runs from the repository root
    assert all("RAY_AUTH_MODE=token" in " ".join(config[key]) for key in ("head_start_ray_commands", "worker_start_ray_commands"))


# --------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_kuberay_clusters_autoscale_gpu_workers(name):
    import ray

    cluster = _cluster_spec(name)
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["authOptions"]["mode"] == "token"
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    gpu_limits = [int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) for pod in _pod_specs(cluster)[1:]]
    assert any(n > 0 for n in gpu_limits)
    images = {c["image"] for pod in _pod_specs(cluster) for c in pod["containers"]}
    assert images == {IMAGE_BUILT_BY_DOCKERFILE}


def test_kuberay_manifests_have_the_expected_kinds():
    kinds = {(d["apiVersion"], d["kind"]) for name in ("raycluster.yaml", "rayjob.yaml", "rayservice.yaml") for d in _docs(name)}
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService")} <= kinds
    pvc = _one("shared-storage.yaml", "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on different nodes write one run_dir


def test_rayjob_runs_a_mounted_spec_that_validates(tmp_path):
    job = _one("rayjob.yaml", "RayJob")
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["raydistill", "run"]
    spec_path = Path(entrypoint[2])

    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = {v["name"]: v for v in head["volumes"]}[_mounts(head)[str(spec_path.parent)]]
    configmap = _one("rayjob.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    raw = yaml.safe_load(configmap["data"][spec_path.name])

    runtime = RuntimeSpec.model_validate(raw["runtime"])
    assert runtime.shared_storage and runtime.ray_address == "auto"
    for pod in _pod_specs(job["spec"]["rayClusterSpec"]):
        assert any(runtime.run_dir.startswith(path + "/") for path in _mounts(pod)), "run_dir is not on a volume every pod mounts"
    # The rest of the spec is valid once its paths exist (they live on the cluster's volume).
    corpus = tmp_path / "prompts.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    (tmp_path / "teacher").mkdir()
    (tmp_path / "student").mkdir()
    raw["teacher"]["model"], raw["student"]["model"], raw["data"]["path"] = str(tmp_path / "teacher"), str(tmp_path / "student"), str(corpus)
    JobSpec.model_validate(raw)


def _service_app() -> dict:
    service = _one("rayservice.yaml", "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app


def test_rayservice_serves_a_student_from_the_shared_volume_through_the_guarded_app():
    """The recipe builds raydistill's guarded app (not ray.serve.llm's bare one) with a key and limits, valid as a serve section."""
    from raydistill.serving.recipe import app_args

    service = _one("rayservice.yaml", "RayService")
    app = _service_app()
    assert app["import_path"] == "raydistill.serving.recipe:app_builder"
    models, serve = app_args(app["args"])
    (model,) = models
    assert model.path.endswith("/student")
    assert serve.api_key_env and serve.max_tokens and serve.max_prompt_chars and serve.max_n and serve.max_body_bytes
    assert 1 <= serve.min_replicas <= serve.max_replicas and serve.replica_resources.get("GPU") == 1
    # The key comes from a Kubernetes Secret on every pod that may build the app, never from the manifest.
    for pod in _pod_specs(service["spec"]["rayClusterConfig"]):
        (env,) = [e for e in pod["containers"][0]["env"] if e["name"] == serve.api_key_env]
        assert set(env) == {"name", "valueFrom"} and env["valueFrom"]["secretKeyRef"]["name"]
    for pod in _pod_specs(service["spec"]["rayClusterConfig"])[1:]:
        assert any(model.path.startswith(path + "/") for path in _mounts(pod))
    # The import path resolves to the builder.
    import importlib

    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_the_app_builder_refuses_bad_args_naming_each_key(monkeypatch):
    from raydistill.serving.recipe import app_args, app_builder
    from raydistill.spec import SpecError

    with pytest.raises(SpecError) as err:
        app_args({"models": [{"model_id": "a"}, {"model_id": "a", "path": "/s"}, {"model_id": "a", "path": "/t"}], "extra": 1,
                  "serve": {"host": "0.0.0.0", "engine_args": {"trust_remote_code": True}, "max_n": 0}})
    text = "\n".join(err.value.errors)
    for expected in ("args: unknown keys ['extra']", "args.models[0]", "model_id values must be unique", "args.serve.max_n",
                     "args.serve.engine_args", "trust_remote_code"):
        assert expected in text, (expected, text)
    with pytest.raises(SpecError, match="args.models: a non-empty list"):
        app_args({"serve": {}})
    # A named key variable that is not set is an error at build time, not an open app.
    monkeypatch.delenv("RD_RECIPE_KEY", raising=False)
    with pytest.raises(SpecError, match="RD_RECIPE_KEY is not set"):
        app_builder({"models": [{"model_id": "m", "path": "/s"}], "serve": {"api_key_env": "RD_RECIPE_KEY"}})


# --------------------------------------------------------------------------- image


def test_dockerfile_builds_on_cuda_and_installs_raydistill_with_vllm():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert re.search(r"-cu\d+", base), base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert re.search(r"^COPY .*raydistill ./raydistill", text, re.M)
    assert re.search(r'pip install [^\n]*"\.\[gpu\]"', text)  # the gpu extra is vllm
    assert "import vllm" in text
