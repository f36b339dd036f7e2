"""The loop's gap measurement: per-row sums agree with the eval stage's scorer, and per-domain means weigh by tokens."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydistill.data.signals import SIGNAL_SCHEMA
from raydistill.loop.gap import domain_gaps, row_gaps

COLUMNS = ["input_ids", "target_start", "topk_ids", "topk_logprobs"]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _batch(rng, lengths, starts, k=4):
    rows = {
        "input_ids": [rng.integers(1, 128, n, dtype=np.int32) for n in lengths],
        "target_start": list(starts),
        "topk_ids": [[rng.choice(128, k, replace=False).tolist() for _ in range(n - s)] for n, s in zip(lengths, starts)],
        "topk_logprobs": [np.sort(np.log(rng.dirichlet(np.ones(k)) * 0.9))[::-1].reshape(1, -1).repeat(n - s, 0).tolist()
                          for n, s in zip(lengths, starts)],
    }
    table = pa.table({c: rows[c] for c in COLUMNS}, schema=pa.schema([SIGNAL_SCHEMA.field(c) for c in COLUMNS]))
    return {c: table[c].combine_chunks().to_numpy(zero_copy_only=False) for c in COLUMNS}


def test_row_gaps_match_the_eval_scorer_row_by_row():
    from raydistill.eval.stage import PairScorer

    model = _model()
    rows = _batch(np.random.default_rng(0), lengths=[9, 5, 12], starts=[3, 1, 11])
    scorer = object.__new__(PairScorer)
    scorer.student, scorer.teacher, scorer.pad_id, scorer.max_seq_len = model, model, 0, 64
    want = scorer(rows)
    got = row_gaps(model, rows, max_seq_len=64, pad_id=0)
    assert got["tokens"].tolist() == want["tokens"].tolist() == [6, 4, 1]
    np.testing.assert_allclose(got["kl"], want["kl"], rtol=1e-6)
    np.testing.assert_allclose(got["nll"], want["student_nll"], rtol=1e-6)
    np.testing.assert_allclose(got["top1_agree"], want["top1_agree"])
    assert (got["kl"] > 0).all()


def test_domain_gaps_weigh_rows_by_their_tokens():
    sums = {"tokens": [2, 6, 0, 4], "kl": [1.0, 3.0, 0.0, 8.0], "nll": [2.0, 6.0, 0.0, 4.0], "top1_agree": [1.0, 3.0, 0.0, 0.0]}
    gaps = domain_gaps(["code", "code", "empty", "chat"], sums)
    assert gaps["code"] == {"rows": 2, "tokens": 8, "kl": 0.5, "nll": 1.0, "top1_agreement": 0.5}
    assert gaps["chat"] == {"rows": 1, "tokens": 4, "kl": 2.0, "nll": 1.0, "top1_agreement": 0.0}
    assert gaps["empty"]["rows"] == 1 and gaps["empty"]["tokens"] == 0 and math.isnan(gaps["empty"]["kl"])
    assert domain_gaps([], {"tokens": [], "kl": [], "nll": [], "top1_agree": []}) == {}
    with pytest.raises(ValueError, match="2 domains for 4 rows"):
        domain_gaps(["a", "b"], sums)
