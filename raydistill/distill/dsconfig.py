"""The DeepSpeed config generated from a ``TrainSpec`` (saved as ``RUN/train/deepspeed.json``)."""

from __future__ import annotations

import copy
from typing import Any

from raydistill.spec import TrainSpec


def precision(train: TrainSpec) -> str:
    """'bf16' or 'fp32': the spec's choice, else bf16 on GPUs and fp32 on CPUs."""
    return train.precision or ("bf16" if train.use_gpu else "fp32")


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: nested dicts key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _scheduler(train: TrainSpec, total_steps: int) -> dict:
    # DeepSpeed steps its own scheduler once per optimizer step, so step counts need no scaling
    # by grad_accum, and the schedule is saved and restored with the engine's checkpoint.
    # DeepSpeed rejects 0 warmup steps (and treats anything below 2 as 2).
    warmup = max(1, min(train.warmup_steps, total_steps))
    params: dict[str, Any] = {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": train.lr,
        "warmup_num_steps": warmup,
        "warmup_type": "linear",
    }
    if train.lr_schedule == "linear_decay":
        return {"type": "WarmupDecayLR", "params": params | {"total_num_steps": max(total_steps, warmup + 1)}}
    return {"type": "WarmupLR", "params": params}


def deepspeed_config(train: TrainSpec, total_steps: int) -> dict:
    """The full DeepSpeed config for ``train`` and a run of ``total_steps`` optimizer steps.

    The optimizer is declared here on GPUs (DeepSpeed picks its fused or, with offload, CPU Adam).
    On CPUs the trainer passes torch's AdamW instead: DeepSpeed's fused Adam needs CUDA, and its
    CPU Adam is a C++ extension compiled on first use.
    """
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # Export gathers the full 16-bit weights on rank 0 instead of saving shards only.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * train.workers,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision(train) == "bf16"},
        "scheduler": _scheduler(train, total_steps),
        "steps_per_print": 1 << 30,
    }
    if train.use_gpu:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "weight_decay": train.weight_decay}}
    else:
        config["zero_allow_untested_optimizer"] = True
        if train.offload_optimizer:
            # ZeRO-Offload insists on DeepSpeedCPUAdam unless told otherwise; on a CPU-only host
            # the states already live in CPU memory, so torch's AdamW does the same job.
            config["zero_force_ds_cpu_optimizer"] = False
    return deep_merge(config, train.deepspeed_overrides)


def uses_client_optimizer(config: dict) -> bool:
    """Whether the trainer must build the optimizer itself (no ``optimizer`` section in the final config)."""
    return "optimizer" not in config
