"""Train stage: Ray Train ``TorchTrainer`` workers running a DeepSpeed engine on teacher signals.

The driver side (``run_train_stage``) builds the trainer; ``train_loop_per_worker`` is what each
worker runs. Workers receive only the typed sub-specs they need (``TrainSpec``, ``DistillSpec``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from raydistill.spec import DistillSpec, TrainSpec

EXPORT_METRICS_FILE = "train_metrics.jsonl"


@dataclass(frozen=True)
class TrainInputs:
    """Everything a worker needs besides its dataset shard."""

    train: TrainSpec
    distill: DistillSpec
    student_path: str
    total_steps: int


def deepspeed_config(train: TrainSpec) -> dict:
    """The DeepSpeed config generated from the spec (saved as ``RUN/train/deepspeed.json``)."""
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * train.workers,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": train.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": train.use_gpu},
        # The optimizer is torch's AdamW: DeepSpeed's fused Adam needs CUDA.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def total_steps(train: TrainSpec, n_train_rows: int) -> int:
    """Optimizer steps for the run: ``max_steps``, or enough for ``epochs`` passes over each shard."""
    if train.max_steps is not None:
        return train.max_steps
    rows_per_worker = n_train_rows // train.workers
    micro_per_epoch = math.ceil(rows_per_worker / train.micro_batch_size)
    return max(1, train.epochs * micro_per_epoch // train.grad_accum)


def _micro_batches(shard, train: TrainSpec, pad_id: int):
    """Collated micro-batches, cycling over the shard for as many epochs as the step count needs.

    Every rank draws exactly ``total_steps * grad_accum`` micro-batches, so all ranks agree on the
    number of collective steps even when shards end at different batch boundaries.
    """
    from raydistill.data.signals import collate

    while True:
        for rows in shard.iter_batches(batch_size=train.micro_batch_size, batch_format="numpy"):
            yield collate(rows, train.max_seq_len, pad_id)


def _to_tensors(batch: dict, device):
    import torch

    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def _export(engine, tokenizer, zero_stage: int, rank: int, out_dir: str) -> None:
    """Save a plain HF directory (safetensors + tokenizer) from the trained engine."""
    # Under ZeRO-3 each rank holds a slice of every parameter; gathering is a collective.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    if rank == 0:
        engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.distill.losses import chunked_distill_loss_sums, loss_params

    inputs: TrainInputs = config["inputs"]
    train, distill = inputs.train, inputs.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(train.seed)
    if not train.use_gpu:
        # Each worker owns its share of the cores; oversubscribed threads thrash on small hosts.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()

    tokenizer = AutoTokenizer.from_pretrained(inputs.student_path)
    model = AutoModelForCausalLM.from_pretrained(inputs.student_path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train), dist_init_required=False
    )
    engine.train()

    batches = _micro_batches(ray.train.get_dataset_shard("train"), train, tokenizer.pad_token_id)
    history = []
    for step in range(1, inputs.total_steps + 1):
        t0 = time.perf_counter()
        micro = [_to_tensors(next(batches), device) for _ in range(train.grad_accum)]
        # The one normalization: the mean over every target token of the global batch (all ranks,
        # all accumulated micro-batches). DeepSpeed divides gradients by world * grad_accum, so
        # each micro-batch's token sum is scaled back by that factor over the global count.
        count = torch.tensor(float(sum(m["targets"].numel() for m in micro)), device=device)
        dist.all_reduce(count)
        scale = world * train.grad_accum / count.clamp_min(1.0)
        sums = torch.zeros(3, device=device)
        for m in micro:
            hidden = engine.module.model(input_ids=m["input_ids"], attention_mask=m["attention_mask"]).last_hidden_state
            pos = m["pred_pos"]
            total, kd, ce = chunked_distill_loss_sums(
                hidden[pos[:, 0], pos[:, 1]],
                engine.module.lm_head,
                m["targets"],
                m["topk_ids"],
                m["topk_logprobs"],
                loss=distill.loss,
                ce_weight=distill.ce_weight,
                temperature=distill.temperature,
                loss_params=loss_params(distill),
            )
            engine.backward(total * scale)
            engine.step()
            sums += torch.stack([total.detach(), kd.detach(), ce.detach()])
        dist.all_reduce(sums)
        loss, kd, ce = (sums / count.clamp_min(1.0)).tolist()
        record = {
            "step": step,
            "loss": loss,
            "kd": kd,
            "ce": ce,
            "tokens": int(count.item()),
            "tokens_per_s": count.item() / (time.perf_counter() - t0),
            "lr": engine.get_lr()[0],
        }
        history.append(record)
        if rank == 0:
            print(
                f"[train] step {step}/{inputs.total_steps} loss {loss:.4f} (kd {kd:.4f}, ce {ce:.4f}) "
                f"{record['tokens_per_s']:.0f} tok/s",
                flush=True,
            )

    with tempfile.TemporaryDirectory() as tmp:
        _export(engine, tokenizer, train.zero_stage, rank, tmp)
        checkpoint = None
        if rank == 0:
            with open(os.path.join(tmp, EXPORT_METRICS_FILE), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in history)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(history[-1], checkpoint=checkpoint)


def run_train_stage(train: TrainSpec, distill: DistillSpec, student_path: str, signals_dir: str, run_dir: str) -> dict:
    """Train the student on ``split == train`` signals; export it to ``RUN/student``. Returns the stage outputs."""
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from transformers import AutoTokenizer

    from raydistill.data.signals import check_tokenizer_matches, read_signals

    check_tokenizer_matches(signals_dir, AutoTokenizer.from_pretrained(student_path))
    train_ds = read_signals(signals_dir, split="train")
    n_rows = train_ds.count()
    if n_rows < train.workers:
        raise ValueError(f"only {n_rows} training rows in {signals_dir}; train.workers={train.workers} needs at least one each")
    steps = total_steps(train, n_rows)
    train_dir = Path(run_dir) / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "deepspeed.json").write_text(json.dumps(deepspeed_config(train), indent=2))
    print(f"[train] {n_rows} training sequences, {train.workers} workers, ZeRO-{train.zero_stage}, {steps} steps", flush=True)

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": TrainInputs(train=train, distill=distill, student_path=student_path, total_steps=steps)},
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets={"train": train_ds},
        run_config=RunConfig(name="train", storage_path=str(Path(run_dir) / "checkpoints")),
    )
    result = trainer.fit()
    student_dir = Path(run_dir) / "student"
    if student_dir.exists():
        shutil.rmtree(student_dir)
    result.checkpoint.to_directory(str(student_dir))
    shutil.move(str(student_dir / EXPORT_METRICS_FILE), str(train_dir / "metrics.jsonl"))
    return {
        "student_dir": str(student_dir),
        "metrics": str(train_dir / "metrics.jsonl"),
        "steps": steps,
        "train_rows": n_rows,
        "final_loss": result.metrics["loss"] if result.metrics else None,
    }
