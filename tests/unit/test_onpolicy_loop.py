"""On-policy bookkeeping: the seeded lmbda plan, rollout rows into micro-batches and shards, the manifest summary."""

import json

import numpy as np
import pytest

from raydistill.data.collate import collate
from raydistill.distill.train import offline_micro_batches_before
from raydistill.onpolicy.loop import ROLLOUTS_META, load_rollouts, on_policy_plan, rollout_rows, summarize, write_shard
from raydistill.spec import DistillSpec


def test_plan_is_deterministic_for_a_seed_and_follows_lmbda():
    assert on_policy_plan(3, 0.5, 7, 16) == on_policy_plan(3, 0.5, 7, 16)
    assert on_policy_plan(3, 0.5, 7, 16) != on_policy_plan(4, 0.5, 7, 16)
    assert all(on_policy_plan(0, 1.0, s, 4) == [True] * 4 for s in range(1, 20))
    assert all(on_policy_plan(0, 0.0, s, 4) == [False] * 4 for s in range(1, 20))
    share = np.mean([x for s in range(1, 2001) for x in on_policy_plan(0, 0.3, s, 1)])
    assert share == pytest.approx(0.3, abs=0.03)


def test_resume_skips_exactly_the_offline_micro_batches_drawn_before():
    distill = DistillSpec(mode="on_policy", on_policy={"lmbda": 0.5, "seed": 1})
    drawn = sum(not on for s in range(1, 11) for on in on_policy_plan(1, 0.5, s, 3))
    assert offline_micro_batches_before(10, distill, 3) == drawn
    assert 0 < drawn < 30
    assert offline_micro_batches_before(10, DistillSpec(), 3) == 30


def _rollouts():
    prompts = {"id": np.array(["a", "b"], dtype=object), "input_ids": None, "target_start": None}
    rollouts = [{"prompt_ids": [1, 5, 6], "response_ids": [7, 8], "policy_version": 4},
                {"prompt_ids": [1, 9], "response_ids": [10, 11, 12], "policy_version": 4}]
    scores = [{"topk_ids": [[7, 3], [8, 2]], "topk_logprobs": [[-0.1, -2.5], [-0.2, -1.9]], "target_logprob": [-0.1, -0.2]},
              {"topk_ids": [[10, 3], [4, 11], [12, 2]], "topk_logprobs": [[-0.3, -1.5], [-0.5, -0.9], [-0.05, -3.0]],
               "target_logprob": [-0.3, -0.9, -0.05]}]
    return prompts, rollouts, scores


def test_rollout_rows_collate_with_the_teachers_logprob_of_each_sampled_token(tmp_path):
    rows = rollout_rows(*_rollouts(), step=5, micro=0, rank=1)
    assert rows["target_start"] == [3, 2] and rows["policy_version"] == [4, 4]
    batch = collate({k: rows[k] for k in ("input_ids", "target_start", "topk_ids", "topk_logprobs", "target_logprob")}, 16, 0)
    assert batch["targets"].tolist() == [7, 8, 10, 11, 12]
    np.testing.assert_allclose(batch["target_logprob"], [-0.1, -0.2, -0.3, -0.9, -0.05], rtol=1e-6)
    assert batch["pred_pos"].tolist() == [[0, 2], [0, 3], [1, 1], [1, 2], [1, 3]]
    cut = collate({k: rows[k] for k in ("input_ids", "target_start", "topk_ids", "topk_logprobs", "target_logprob")}, 4, 0)
    np.testing.assert_allclose(cut["target_logprob"], [-0.1, -0.3, -0.9], rtol=1e-6)

    write_shard(str(tmp_path), rows, "step000005-m0-r1")
    table = load_rollouts(tmp_path)
    assert table.num_rows == 2 and table["policy_version"].to_pylist() == [4, 4]
    assert table["source_id"].to_pylist() == ["a", "b"] and table["step"].to_pylist() == [5, 5]
    assert table["target_logprob"].to_pylist()[1] == pytest.approx([-0.3, -0.9, -0.05])


def test_summary_reports_staleness_and_phase_times(tmp_path):
    prompts, rollouts, scores = _rollouts()
    write_shard(str(tmp_path), rollout_rows(prompts, rollouts, scores, step=5, micro=0, rank=0), "a")
    write_shard(str(tmp_path), rollout_rows(prompts, [{**r, "policy_version": 2} for r in rollouts], scores, step=3, micro=0, rank=1), "b")
    history = [
        {"step": 1, "rollouts": 4, "policy_version": 0, "rollout_s": 1.0, "score_s": 0.5, "sync_s": 0.0, "train_s": 2.0},
        {"step": 2, "rollouts": 0, "policy_version": None, "rollout_s": 0.0, "score_s": 0.0, "sync_s": 0.2, "train_s": 2.0},
        {"step": 3, "rollouts": 4, "policy_version": 2, "rollout_s": 1.0, "score_s": 0.5, "sync_s": 0.0, "train_s": 2.0},
    ]
    out = summarize(history, tmp_path, sync_every=2)
    assert out["rollouts"] == 4 and out["policy_versions"] == [2, 4] and out["max_staleness"] == 0
    assert out["phase_seconds"] == {"rollout_s": 2.0, "score_s": 1.0, "sync_s": 0.2, "train_s": 6.0}
    assert json.loads((tmp_path / ROLLOUTS_META).read_text()) == out
