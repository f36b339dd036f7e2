"""configs/gpu/: the GPU recipes validate against the spec (their model and corpus paths are placeholders)."""

from pathlib import Path

import pytest
import yaml

from raydistill.spec import JobSpec

RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs" / "gpu").glob("*.yaml"))


def test_there_are_recipes_for_two_pairs_on_one_and_two_nodes():
    names = {p.stem for p in RECIPES}
    assert {n.rsplit("-", 1)[1] for n in names} == {"1node", "2node"} and len(names) == 4


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_a_valid_gpu_spec(recipe, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    # The placeholders stand for paths on the cluster; validate everything else with stand-ins.
    for key in ("teacher", "student"):
        (tmp_path / key).mkdir()
        raw[key]["model"] = str(tmp_path / key)
    corpus = tmp_path / "prompts.jsonl"
    corpus.write_text('{"prompt": "hi"}\n')
    raw["data"]["path"] = str(corpus)
    raw["runtime"]["run_dir"] = str(tmp_path / "run")
    spec = JobSpec.model_validate(raw)
    gpus = 8 * int(recipe.stem.rsplit("-", 1)[1][0])
    assert spec.teacher.use_gpu and spec.train.use_gpu and spec.train.precision == "bf16"
    assert spec.teacher.engine_args["dtype"] == "bfloat16" and spec.teacher.engine_args["tensor_parallel_size"] == 1
    assert spec.teacher.replicas.max * spec.teacher.engine_args["tensor_parallel_size"] == gpus == spec.train.workers
    assert spec.serve.replica_resources.get("GPU") == 1 and spec.runtime.shared_storage and spec.runtime.ray_address == "auto"
