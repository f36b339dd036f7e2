"""Student initialization: a pretrained directory, or a depth-pruned copy of the teacher.

Depth pruning (DistilBERT, Minitron) keeps a subset of the teacher's decoder layers and all of
its other weights: embeddings, final norm and LM head, plus its tokenizer and generation
config. The student therefore starts with the teacher's vocabulary and token representations,
and the signals' tokenizer fingerprint matches by construction.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from pathlib import Path

from raydistill.spec import StudentSpec
from raydistill.jobs.rundir import RunDir

PRUNE_INFO_FILE = "raydistill_prune.json"
# Decoder layers live under `model.layers.<i>.` in Llama, Gemma 3, Qwen, Mistral and friends.
_LAYER_KEY = re.compile(r"^(.*\blayers)\.(\d+)\.(.*)$")


def kept_layers(num_layers: int, layers: list[int] | None = None, every_nth: int | None = None) -> list[int]:
    """The teacher layer indices a pruned student keeps, ascending, validated against ``num_layers``."""
    if layers is not None:
        out = [i + num_layers if i < 0 else i for i in layers]
        bad = [i for i, o in zip(layers, out) if not 0 <= o < num_layers]
        if bad:
            raise ValueError(f"student.layers: {bad} out of range for a teacher with {num_layers} layers")
        if len(set(out)) != len(out):
            raise ValueError(f"student.layers: {layers} names a layer twice")
        if out != sorted(out):
            raise ValueError(f"student.layers: {layers} must be in ascending order (layers cannot be reordered)")
        return out
    if every_nth is None:
        raise ValueError("give layers or every_nth")
    # The last layer is kept too: it shaped the representation the teacher's LM head reads.
    return sorted(set(range(0, num_layers, every_nth)) | {num_layers - 1})


def _per_layer_lists(config_dict: dict, num_layers: int, keep: list[int]) -> dict:
    """Cut every list in the (text) config that has one entry per layer, e.g. Gemma 3's ``layer_types``."""
    out = {}
    for key, value in config_dict.items():
        if isinstance(value, list) and len(value) == num_layers and key not in ("architectures",):
            out[key] = [value[i] for i in keep]
    return out


def pruned_config(config, keep: list[int]):
    """A copy of a transformers config with ``num_hidden_layers`` and per-layer lists cut to ``keep``."""
    new = copy.deepcopy(config)
    target = new.get_text_config() if hasattr(new, "get_text_config") else new
    n = target.num_hidden_layers
    for key, value in _per_layer_lists(target.to_dict(), n, keep).items():
        setattr(target, key, value)
    target.num_hidden_layers = len(keep)
    return new


def pruned_state_dict(state: dict, keep: list[int]) -> dict:
    """The teacher's state dict with decoder layer ``keep[j]`` renamed to layer ``j`` and the rest dropped."""
    remap = {old: new for new, old in enumerate(keep)}
    out = {}
    for name, tensor in state.items():
        m = _LAYER_KEY.match(name)
        if m is None:
            out[name] = tensor
        elif int(m.group(2)) in remap:
            out[f"{m.group(1)}.{remap[int(m.group(2))]}.{m.group(3)}"] = tensor
    return out


def prune_from_teacher(teacher_path: str, out_dir: str, layers: list[int] | None = None, every_nth: int | None = None) -> dict:
    """Write a depth-pruned student of ``teacher_path`` to ``out_dir`` (HF dir: safetensors, config, tokenizer).

    Returns what was done: ``{"teacher": path, "teacher_layers": n, "kept_layers": [...]}`` (also
    saved as ``raydistill_prune.json`` in ``out_dir``). The directory is written atomically.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(teacher_path)
    n = (config.get_text_config() if hasattr(config, "get_text_config") else config).num_hidden_layers
    keep = kept_layers(n, layers, every_nth)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    student_config = pruned_config(teacher.config, keep)
    student = type(teacher)(student_config)
    missing, unexpected = student.load_state_dict(pruned_state_dict(teacher.state_dict(), keep), strict=False)
    # Tied LM heads are not separate entries; anything else missing would be left random.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and student_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"pruning {teacher_path}: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    student.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_path).save_pretrained(tmp)
    try:
        GenerationConfig.from_pretrained(teacher_path).save_pretrained(tmp)
    except OSError:
        pass  # the teacher has no generation_config.json; transformers derives one from config
    info = {"teacher": teacher_path, "teacher_layers": n, "kept_layers": keep}
    (tmp / PRUNE_INFO_FILE).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def prepare_student(student: StudentSpec, teacher_path: str, student_model_path: str | None, run: RunDir) -> str:
    """The directory training starts from: ``student_model_path``, or a pruned teacher in ``run.student_init``.

    Pruning is skipped when ``RUN/student_init`` already holds the same pruning of the same teacher,
    so a resumed run starts from identical weights.
    """
    if student.init == "pretrained":
        if student_model_path is None:
            raise ValueError("student.model: required when student.init is 'pretrained'")
        return student_model_path
    out = run.student_init
    info_file = out / PRUNE_INFO_FILE
    if info_file.exists():
        info = json.loads(info_file.read_text())
        n = info["teacher_layers"]
        if info["teacher"] == teacher_path and info["kept_layers"] == kept_layers(n, student.layers, student.every_nth):
            return str(out)
    info = prune_from_teacher(teacher_path, str(out), student.layers, student.every_nth)
    print(f"[train] student pruned from the teacher: layers {info['kept_layers']} of {info['teacher_layers']} -> {out}", flush=True)
    return str(out)


def freeze_embeddings(model) -> int:
    """Stop gradients to the input embeddings (and a tied LM head). Returns the number of frozen parameters."""
    emb = model.get_input_embeddings()
    for p in emb.parameters():
        p.requires_grad_(False)
    return sum(p.numel() for p in emb.parameters())
