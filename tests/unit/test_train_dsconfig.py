"""The DeepSpeed config built from a TrainSpec (no Ray, no DeepSpeed engine)."""

import pytest
from pydantic import ValidationError

from raydistill.distill.dsconfig import deep_merge, deepspeed_config, uses_client_optimizer
from raydistill.spec import TrainSpec


def test_defaults_on_cpu():
    c = deepspeed_config(TrainSpec(workers=2, micro_batch_size=4, grad_accum=3, lr=1e-3, warmup_steps=5), total_steps=100)
    assert c["train_batch_size"] == 24 and c["gradient_accumulation_steps"] == 3
    assert c["zero_optimization"] == {"stage": 2}
    assert c["bf16"] == {"enabled": False} and c["gradient_clipping"] == 1.0
    assert deepspeed_config(TrainSpec(), total_steps=10)["scheduler"]["params"]["warmup_num_steps"] == 1
    assert c["scheduler"] == {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3, "warmup_num_steps": 5,
                                                                   "warmup_type": "linear", "total_num_steps": 100}}
    assert uses_client_optimizer(c) and c["zero_allow_untested_optimizer"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages(stage):
    c = deepspeed_config(TrainSpec(zero_stage=stage), total_steps=10)
    assert c["zero_optimization"]["stage"] == stage
    assert c["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)


def test_gpu_bf16_offload_constant_schedule():
    t = TrainSpec(use_gpu=True, zero_stage=3, offload_optimizer=True, lr_schedule="constant", grad_clip=0.5, weight_decay=0.1)
    c = deepspeed_config(t, total_steps=10)
    assert c["bf16"] == {"enabled": True} and c["gradient_clipping"] == 0.5
    assert c["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert c["optimizer"] == {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": 0.1}} and not uses_client_optimizer(c)
    assert c["scheduler"]["type"] == "WarmupLR" and "total_num_steps" not in c["scheduler"]["params"]
    cpu = deepspeed_config(TrainSpec(zero_stage=2, offload_optimizer=True, precision="bf16"), total_steps=10)
    assert cpu["zero_force_ds_cpu_optimizer"] is False and cpu["bf16"] == {"enabled": True}


def test_overrides_merge_last_and_deep():
    t = TrainSpec(zero_stage=3, deepspeed_overrides={"zero_optimization": {"stage3_max_live_parameters": 1000}, "gradient_clipping": 2.0,
                                                    "wall_clock_breakdown": True})
    c = deepspeed_config(t, total_steps=10)
    assert c["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True, "stage3_max_live_parameters": 1000}
    assert c["gradient_clipping"] == 2.0 and c["wall_clock_breakdown"] is True
    assert deep_merge({"a": {"b": 1}}, {"a": 2}) == {"a": 2}


def test_warmup_longer_than_the_run_is_capped():
    c = deepspeed_config(TrainSpec(warmup_steps=50), total_steps=10)
    assert c["scheduler"]["params"]["warmup_num_steps"] == 10 and c["scheduler"]["params"]["total_num_steps"] == 11


def test_offload_needs_zero():
    with pytest.raises(ValidationError, match="offload_optimizer needs zero_stage"):
        TrainSpec(zero_stage=0, offload_optimizer=True)
