"""student.layers 'auto': each teacher layer's block influence, the choice, and the record of both (no Ray)."""

import json

import pytest
import torch

from raydistill.distill.init import PRUNE_INFO_FILE, block_influence, choose_layers, prepare_student
from raydistill.jobs.rundir import RunDir
from raydistill.models import build_tiny_tokenizer
from raydistill.spec import StudentSpec


def _llama(num_layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _silence(model, layer: int):
    """Make ``layer`` a no-op: its attention and MLP write nothing into the residual stream."""
    block = model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


SEQUENCES = [[1, 5, 9, 200, 33, 7, 81], [2, 400, 12, 12, 90], [3]]  # the 1-token one has no transition to measure


@pytest.mark.parametrize("silent", [0, 2, 3])
def test_a_layer_that_changes_nothing_scores_zero_and_is_dropped_first(silent):
    model = _llama(4)
    _silence(model, silent)
    scores = block_influence(model, SEQUENCES)
    assert len(scores) == 4 and abs(scores[silent]) < 1e-9
    assert all(s > 1e-4 for i, s in enumerate(scores) if i != silent)
    assert choose_layers(scores, 3) == [i for i in range(4) if i != silent]


def test_block_influence_is_one_minus_the_mean_cosine_of_each_layers_input_and_output():
    """Against a direct computation with hooks on every layer (the last layer measured before the final norm)."""
    model = _llama(3, seed=1)
    ins, outs = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda _m, args, kwargs, i=i: ins.__setitem__(i, kwargs.get("hidden_states", args[0] if args else None)),
                                                     with_kwargs=True))
        hooks.append(layer.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    total, count = torch.zeros(3, dtype=torch.float64), 0
    with torch.no_grad():
        for ids in SEQUENCES[:2]:
            model(input_ids=torch.tensor([ids]))
            for i in range(3):
                total[i] += (1 - torch.nn.functional.cosine_similarity(ins[i][0].double(), outs[i][0].double(), dim=-1)).sum()
            count += len(ids)
    for h in hooks:
        h.remove()
    assert block_influence(model, SEQUENCES) == pytest.approx((total / count).tolist(), rel=1e-9, abs=1e-12)


def test_choose_layers_keeps_the_highest_in_order_and_checks_the_count():
    assert choose_layers([0.3, 0.1, 0.3, 0.2], 2) == [0, 2]
    assert choose_layers([0.1, 0.2, 0.2], 1) == [1]  # a tie goes to the earlier layer
    assert choose_layers([0.5, 0.4], 2) == [0, 1]
    for bad in (0, 3):
        with pytest.raises(ValueError, match="student.num_layers"):
            choose_layers([0.1, 0.2], bad)
    with pytest.raises(ValueError, match="calibration sequence"):
        block_influence(_llama(2), [[4]])


def test_auto_layers_are_measured_recorded_and_reused(tmp_path, monkeypatch):
    import raydistill.distill.init as init

    teacher = tmp_path / "teacher"
    model = _llama(4)
    _silence(model, 1)
    model.save_pretrained(teacher, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(teacher)
    run = RunDir.of(str(tmp_path / "run"))
    spec = StudentSpec(init="prune_from_teacher", layers="auto", num_layers=3, calibration_rows=2)
    asked = []

    def calibration(rows):
        asked.append(rows)
        return SEQUENCES[:rows]

    out = prepare_student(spec, str(teacher), None, run, calibration)
    info = json.loads((run.student_init / PRUNE_INFO_FILE).read_text())
    assert asked == [2] and info["kept_layers"] == [0, 2, 3]
    sel = info["selection"]
    assert sel["method"] == "block_influence" and sel["num_layers"] == 3 and sel["calibration_rows"] == 2
    assert len(sel["scores"]) == 4 and sel["scores"][1] == pytest.approx(0.0, abs=1e-9) and sel["calibration_tokens"] == 12
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).num_hidden_layers == 3
    # The same choice asked again: kept as it is, nothing measured again.
    monkeypatch.setattr(init, "score_teacher_layers", lambda *a: pytest.fail("measured again"))
    assert prepare_student(spec, str(teacher), None, run, calibration) == out and asked == [2]
    # Another count is another choice; a hand-picked list never reuses a measured one.
    monkeypatch.undo()
    prepare_student(spec.model_copy(update={"num_layers": 2}), str(teacher), None, run, calibration)
    two = json.loads((run.student_init / PRUNE_INFO_FILE).read_text())
    assert len(two["kept_layers"]) == 2 and 1 not in two["kept_layers"] and two["selection"]["num_layers"] == 2
    picked = StudentSpec(init="prune_from_teacher", layers=[0, 2, 3])
    prepare_student(picked, str(teacher), None, run)
    assert "selection" not in json.loads((run.student_init / PRUNE_INFO_FILE).read_text())


def test_auto_needs_num_layers_and_only_auto_takes_it():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="num_layers: needed with layers 'auto'"):
        StudentSpec(init="prune_from_teacher", layers="auto")
    with pytest.raises(ValidationError, match="num_layers: needed with layers 'auto', and only there"):
        StudentSpec(init="prune_from_teacher", layers=[0, 1], num_layers=2)
    with pytest.raises(ValidationError, match="num_layers: only used"):
        StudentSpec(init="pretrained", model="tiny:student", num_layers=2)
    with pytest.raises(ValidationError):
        StudentSpec(init="prune_from_teacher", layers="best", num_layers=2)


def test_calibration_rows_are_the_first_training_rows_by_id(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.data.signals import PARQUET_WRITE_ARGS, SIGNAL_SCHEMA, encode_signals, write_signal_meta
    from raydistill.distill.train import calibration_sequences

    rows = [{"id": i, "split": split, "input_ids": ids, "target_start": 1, "topk_ids": [[3, 4]] * (len(ids) - 1),
             "topk_logprobs": [[-0.5, -1.5]] * (len(ids) - 1), "prompt": "p", "response": "r"}
            for i, split, ids in [("c", "train", [1, 7, 8]), ("a", "eval", [1, 2]), ("b", "train", [1, 5]), ("d", "train", [1, 9, 9, 9])]]
    pq.write_table(encode_signals(pa.Table.from_pylist(rows).select(SIGNAL_SCHEMA.names).cast(SIGNAL_SCHEMA)), tmp_path / "part-0.parquet",
                   **PARQUET_WRITE_ARGS)
    write_signal_meta(tmp_path, {"logprob_scale": 16})
    assert calibration_sequences(tmp_path, 2) == [[1, 5], [1, 7, 8]]
    assert calibration_sequences(tmp_path, 10) == [[1, 5], [1, 7, 8], [1, 9, 9, 9]]
