"""Trainer pieces that need neither Ray nor DeepSpeed: step counts, resumed data order, metrics log."""

import json

import numpy as np
import pytest

from raydistill.distill.export import reference_batch
from raydistill.distill.train import MetricsLog, _micro_batches, total_steps
from raydistill.spec import TrainSpec


class FakeShard:
    """Stands in for a Ray Data shard: each iteration yields the same batches in order."""

    def __init__(self, n_rows: int):
        self.rows = [{"input_ids": [1, 10 + i, 11 + i], "target_start": 1, "topk_ids": [[5, 6]] * 2, "topk_logprobs": [[-0.5, -1.5]] * 2}
                     for i in range(n_rows)]

    def iter_batches(self, batch_size, batch_format):
        for s in range(0, len(self.rows), batch_size):
            chunk = self.rows[s : s + batch_size]
            yield {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}


def test_total_steps():
    assert total_steps(TrainSpec(max_steps=7), 1000) == 7
    # 10 rows per worker / micro 4 -> 3 micro-batches per epoch; 2 epochs / accum 2 -> 3 steps.
    assert total_steps(TrainSpec(workers=2, micro_batch_size=4, grad_accum=2, epochs=2), 20) == 3


def test_resume_skips_exactly_the_consumed_micro_batches():
    train = TrainSpec(micro_batch_size=2, max_seq_len=8)
    full = _micro_batches(FakeShard(5), train, pad_id=0)
    reference = [next(full)["input_ids"].tolist() for _ in range(8)]  # cycles over the 3 batches of 5 rows
    resumed = _micro_batches(FakeShard(5), train, pad_id=0, skip=4)
    assert [next(resumed)["input_ids"].tolist() for _ in range(4)] == reference[4:]


def test_reference_batch_is_fixed():
    a, b = reference_batch(512, 0), reference_batch(512, 0)
    assert a.shape == (2, 16) and (a == b).all() and int(a.max()) < 512


def test_metrics_log_writes_only_on_rank_zero(tmp_path, capsys):
    record = {"step": 1, "loss": 2.0, "kd": 2.0, "ce": 3.0, "tokens_per_s": 10.0, "lr": 1e-3, "grad_norm": None}
    MetricsLog(1, str(tmp_path), tensorboard=False, total=3).step(record)
    assert not (tmp_path / "progress.jsonl").exists()
    log = MetricsLog(0, str(tmp_path), tensorboard=True, total=3)
    log.event({"event": "resumed_from", "step": 0})
    log.step(record)
    log.close()
    lines = [json.loads(l) for l in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert lines == [{"event": "resumed_from", "step": 0}, record]
    assert "step 1/3 loss 2.0000" in capsys.readouterr().out
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_checkpoint_of_another_run_is_refused():
    from raydistill.distill.train import TrainInputs, check_checkpoint, checkpoint_identity
    from raydistill.spec import DistillSpec, TrainSpec

    inputs = TrainInputs(train=TrainSpec(lr=1e-3), distill=DistillSpec(), student_path="/models/student", total_steps=10, ds_config={})
    check_checkpoint({"identity": checkpoint_identity(inputs)}, inputs, "RUN/checkpoints")  # its own: accepted
    # Cadence and retry settings do not make it another run's.
    same = TrainInputs(train=TrainSpec(lr=1e-3, checkpoint_every=3, max_failures=0), distill=DistillSpec(), student_path="/models/student",
                       total_steps=10, ds_config={})
    check_checkpoint({"identity": checkpoint_identity(inputs)}, same, "RUN/checkpoints")
    other = TrainInputs(train=TrainSpec(lr=5e-4), distill=DistillSpec(loss="jsd"), student_path="/models/other", total_steps=10, ds_config={})
    with pytest.raises(RuntimeError, match=r"not this run's: it was made with other train.lr, distill.loss, student_init"):
        check_checkpoint({"identity": checkpoint_identity(inputs)}, other, "RUN/checkpoints")
    with pytest.raises(RuntimeError, match="records no identity"):
        check_checkpoint({"step": 4}, inputs, "RUN/checkpoints")


def test_zero3_frozen_head_is_one_without_trainable_parameters():
    import torch

    from raydistill.distill.train import _zero3_frozen_head

    embed = torch.nn.Embedding(11, 4)
    head = torch.nn.Linear(4, 11, bias=False)
    assert not _zero3_frozen_head(head)
    head.weight = embed.weight  # tied, as in a tied HF model
    embed.weight.requires_grad_(False)  # raydistill.distill.init.freeze_embeddings
    assert _zero3_frozen_head(head)
    assert not _zero3_frozen_head(torch.nn.Sequential(head))  # the fused loss needs a plain nn.Linear


@pytest.mark.parametrize("n_tokens", [5, 0])
def test_always_fused_loss_needs_no_head_in_backward(n_tokens):
    """The ZeRO-3 frozen-head path: one chunk (or none) through the fused loss equals the plain path, and backward
    still works after the head's weight is emptied, as DeepSpeed's re-partition does on leaving GatheredParameters."""
    import torch

    from raydistill.distill.losses import chunked_distill_loss_sums

    torch.manual_seed(0)
    head = torch.nn.Linear(4, 11, bias=False).requires_grad_(False)
    hidden = torch.randn(n_tokens, 4, requires_grad=True)
    targets = torch.randint(0, 11, (n_tokens,))
    ids = torch.rand(n_tokens, 11).topk(3).indices
    lps = torch.log_softmax(torch.randn(n_tokens, 4), -1)[:, :3]
    plain = chunked_distill_loss_sums(hidden, head, targets, ids, lps, ce_weight=0.3, chunk_tokens=16)
    (grad_plain,) = torch.autograd.grad(plain[0], hidden)
    fused = chunked_distill_loss_sums(hidden, head, targets, ids, lps, ce_weight=0.3, chunk_tokens=16, always_fuse=True)
    head.weight.data = torch.empty(0)
    (grad_fused,) = torch.autograd.grad(fused[0], hidden)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="always_fuse"):
        chunked_distill_loss_sums(hidden, head, targets, ids, lps, always_fuse=True, always_recompute=True)
