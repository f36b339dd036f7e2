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
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

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


def text_config(config):
    """The decoder's config: a multimodal model's text sub-config, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def pruned_config(config, keep: list[int]):
    """A copy of a transformers config with ``num_hidden_layers`` and per-layer lists cut to ``keep``."""
    new = copy.deepcopy(config)
    target = text_config(new)
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


def prune_from_teacher(teacher_path: str, out_dir: str, layers: list[int] | None = None, every_nth: int | None = None,
                       selection: dict | None = None) -> dict:
    """Write a depth-pruned student of ``teacher_path`` to ``out_dir`` (HF dir: safetensors, config, tokenizer).

    Returns what was done: ``{"teacher": path, "teacher_layers": n, "kept_layers": [...]}``, plus
    ``selection`` (how the layers were chosen, when they were measured) if given; also saved as
    ``raydistill_prune.json`` in ``out_dir``. The directory is written atomically.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(teacher_path)
    n = text_config(config).num_hidden_layers
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
    info = {"teacher": teacher_path, "teacher_layers": n, "kept_layers": keep, **({"selection": selection} if selection else {})}
    (tmp / PRUNE_INFO_FILE).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info


def block_influence(model, sequences: list[list[int]]) -> list[float]:
    """Each decoder layer's block influence (ShortGPT, Men et al. 2024) on ``sequences`` of token ids.

    BI_l = 1 - mean over tokens of cos(h_l, h_(l+1)), where h_l is the hidden state entering layer
    l and h_(l+1) the one leaving it: a layer that barely turns its input scores near 0 and is
    the cheapest to drop. One forward pass per sequence, no gradients.
    """
    import torch

    n = text_config(model.config).num_hidden_layers
    total, count = torch.zeros(n, dtype=torch.float64), 0
    model.eval()
    with torch.no_grad():
        for ids in sequences:
            if len(ids) < 2:
                continue
            # output_hidden_states: the embeddings, then each layer's output; the last one has the final
            # norm applied in transformers' decoders, so the last layer is measured against its pre-norm
            # output, captured by a hook, to score what the layer itself does.
            outs: list = []
            hook = model.get_decoder().layers[-1].register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
            try:
                hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            finally:
                hook.remove()
            states = list(hidden[:n]) + [outs[-1]]
            for layer in range(n):
                cos = torch.nn.functional.cosine_similarity(states[layer][0].double(), states[layer + 1][0].double(), dim=-1)
                total[layer] += (1.0 - cos).sum()
            count += len(ids)
    if not count:
        raise ValueError("layer scoring needs at least one calibration sequence of 2 or more tokens")
    return (total / count).tolist()


def _batch_nll_sum(model, sequences: list[list[int]]) -> float:
    """Summed next-token NLL of ``sequences``, right-padded into one forward pass (a batch is several times
    faster than one pass per row on a CPU, where the large-vocabulary LM head dominates)."""
    import torch

    width = max(len(ids) for ids in sequences)
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return (nll.double() * mask[:, 1:]).sum().item()


@contextmanager
def only_layers(model, keep: list[int]):
    """``model`` with only its decoder layers ``keep``, cut in memory (no copy) and restored on exit.

    The decoders index per-layer lists of the config (attention type, sliding window) by position
    in ``layers``, so the config is cut the same way for the forward passes inside."""
    import torch

    decoder = model.get_decoder()
    layers = decoder.layers
    config = text_config(model.config)
    n, layer_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    decoder.layers, config.num_hidden_layers = torch.nn.ModuleList([layers[i] for i in keep]), len(keep)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep]
    try:
        yield model
    finally:
        decoder.layers, config.num_hidden_layers = layers, n
        if layer_types is not None:
            config.layer_types = layer_types


def drop_one_nll(model, sequences: list[list[int]], batch_size: int = 4) -> list[float]:
    """Each decoder layer's depth importance (Minitron, Muralidharan et al. 2024) on ``sequences``.

    Score of layer l: the mean next-token NLL (nats/token) of ``model`` with layer l removed. A
    layer whose removal barely raises the loss scores near the full model's NLL and is the cheapest
    to drop. Unlike block influence it measures the effect on the output, so it sees a layer whose
    small turn of the residual stream the later layers depend on. One forward pass per layer and
    batch of ``batch_size`` sequences, no gradients.
    """
    import torch

    config = text_config(model.config)
    n = config.num_hidden_layers
    sequences = [ids for ids in sequences if len(ids) >= 2]
    if not sequences:
        raise ValueError("layer scoring needs at least one calibration sequence of 2 or more tokens")
    count = sum(len(ids) - 1 for ids in sequences)
    scores = []
    model.eval()
    for drop in range(n):
        with only_layers(model, [i for i in range(n) if i != drop]), torch.no_grad():
            total = sum(_batch_nll_sum(model, sequences[start:start + batch_size]) for start in range(0, len(sequences), batch_size))
        scores.append(total / count)
    return scores


LAYER_SCORES = {"block_influence": block_influence, "drop_one": drop_one_nll}


def choose_layers(scores: list[float], num_layers: int) -> list[int]:
    """The ``num_layers`` layers with the highest scores, in ascending order (ties: the earlier layer)."""
    if not 1 <= num_layers <= len(scores):
        raise ValueError(f"student.num_layers: {num_layers} must be between 1 and the teacher's {len(scores)} layers")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:num_layers])


def score_teacher_layers(teacher_path: str, sequences: list[list[int]], method: str = "block_influence") -> list[float]:
    """``method``'s score (a name in ``LAYER_SCORES``) of ``teacher_path``'s layers, loaded in float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
    return LAYER_SCORES[method](teacher, sequences)


def prepare_student(student: StudentSpec, teacher_path: str, student_model_path: str | None, run: RunDir,
                    calibration: Callable[[int], list[list[int]]] | None = None) -> str:
    """The directory training starts from: ``student_model_path``, or a pruned teacher in ``run.student_init``.

    With ``student.layers: auto``, the layers are chosen by measuring each one's block influence on
    ``calibration(student.calibration_rows)`` (token id sequences of the teacher's own text), and
    the scores and the choice are kept in the prune info (``raydistill_prune.json``).
    Pruning is skipped when ``RUN/student_init`` already holds the same pruning of the same teacher,
    so a resumed run starts from identical weights.
    """
    if student.init == "pretrained":
        if student_model_path is None:
            raise ValueError("student.model: required when student.init is 'pretrained'")
        return student_model_path
    out = run.student_init
    info_file = out / PRUNE_INFO_FILE
    auto = student.layers == "auto"
    wanted_selection = {"method": student.layer_scoring, "num_layers": student.num_layers, "calibration_rows": student.calibration_rows} if auto else None
    if info_file.exists():
        info = json.loads(info_file.read_text())
        n = info["teacher_layers"]
        if info["teacher"] == teacher_path:
            if auto and {k: info.get("selection", {}).get(k) for k in wanted_selection} == wanted_selection:
                return str(out)
            if not auto and "selection" not in info and info["kept_layers"] == kept_layers(n, student.layers, student.every_nth):
                return str(out)
    selection = None
    layers = student.layers
    if auto:
        if calibration is None:
            raise ValueError("student.layers 'auto' needs calibration text (the teacher's signals)")
        sequences = calibration(student.calibration_rows)
        scores = score_teacher_layers(teacher_path, sequences, student.layer_scoring)
        layers = choose_layers(scores, student.num_layers)
        selection = {**wanted_selection, "scores": [round(x, 6) for x in scores], "calibration_tokens": sum(len(s) for s in sequences)}
        print(f"[train] layer scores ({student.layer_scoring.replace('_', ' ')}, {len(sequences)} calibration rows): "
              + ", ".join(f"{i}: {x:.4f}" for i, x in enumerate(scores)), flush=True)
    info = prune_from_teacher(teacher_path, str(out), layers, None if auto else student.every_nth, selection)
    print(f"[train] student pruned from the teacher: layers {info['kept_layers']} of {info['teacher_layers']}"
          + (f" (chosen by {student.layer_scoring.replace('_', ' ')})" if auto else "") + f" -> {out}", flush=True)
    return str(out)


def freeze_embeddings(model) -> int:
    """Stop gradients to the input embeddings (and a tied LM head). Returns the number of frozen parameters."""
    emb = model.get_input_embeddings()
    for p in emb.parameters():
        p.requires_grad_(False)
    return sum(p.numel() for p in emb.parameters())
