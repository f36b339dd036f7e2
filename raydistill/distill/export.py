"""The student's Hugging Face export: written from the DeepSpeed engine inside training, copied out, checked.

The last checkpoint holds a plain HF directory (safetensors, config, generation config,
tokenizer) plus the in-training model's logits on a fixed reference batch; ``export_student``
copies it to ``RUN/student`` and reloads it with transformers to measure how far the export's
logits are from the in-training model's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

EXPORT_DIR = "student"
EXPORT_METRICS_FILE = "train_metrics.jsonl"
REFERENCE_LOGITS_FILE = "reference_logits.pt"


def reference_batch(vocab_size: int, seed: int):
    """A fixed [2, 16] batch of token ids on which export fidelity is checked."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, 16), generator=g)


def export_hf(engine, tokenizer, zero_stage: int, rank: int, out_dir: str) -> None:
    """Save a plain HF directory (safetensors, config, generation config, tokenizer) from the engine."""
    # Under ZeRO-3 each rank holds a slice of every parameter; gathering is a collective.
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    if rank == 0:
        engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


def reference_logits(engine, seed: int):
    """[2, 16, V] logits of the in-training model on ``reference_batch`` (all ranks: ZeRO-3 gathers)."""
    import torch

    model = engine.module
    ids = reference_batch(model.config.get_text_config().vocab_size, seed).to(engine.device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    model.train()
    return ids.cpu(), logits


def check_export(student_dir: str, reference_path: str) -> float:
    """Max |logit difference| between the exported model and the in-training model on the reference batch."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = torch.load(reference_path)
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits.float()
    return float((logits - ref["logits"]).abs().max())


def export_student(checkpoint, student_dir: Path, train_dir: Path) -> tuple[Path, float]:
    """Copy the final checkpoint's export to ``student_dir`` (and its metrics to ``train_dir``); return it and its logit check."""
    if student_dir.exists():
        shutil.rmtree(student_dir)
    with checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / EXPORT_DIR, student_dir)
        shutil.copy(Path(ckpt) / EXPORT_METRICS_FILE, train_dir / "metrics.jsonl")
        shutil.copy(Path(ckpt) / REFERENCE_LOGITS_FILE, train_dir / REFERENCE_LOGITS_FILE)
    return student_dir, check_export(str(student_dir), str(train_dir / REFERENCE_LOGITS_FILE))
