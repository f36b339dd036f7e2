"""student.layers 'auto': each teacher layer's block influence or drop-one NLL, the choice, and the record of both (no Ray)."""

import json

import pytest
import torch

from raydistill.distill.init import PRUNE_INFO_FILE, block_influence, choose_layers, drop_one_nll, prepare_student
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


def _saved_teacher(tmp_path, silent: int):
    """A 4-layer teacher with layer ``silent`` made a no-op, saved with the tiny tokenizer; (its directory, the model)."""
    teacher = tmp_path / "teacher"
    model = _llama(4)
    _silence(model, silent)
    model.save_pretrained(teacher, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(teacher)
    return teacher, model


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

    teacher, _ = _saved_teacher(tmp_path, silent=1)
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

    from raydistill.data.signals import LOGPROB_SCALE, PARQUET_WRITE_ARGS, SIGNAL_SCHEMA, encode_signals, write_signal_meta
    from raydistill.distill.train import calibration_sequences

    rows = [{"id": i, "split": split, "input_ids": ids, "target_start": 1, "topk_ids": [[3, 4]] * (len(ids) - 1),
             "topk_logprobs": [[-0.5, -1.5]] * (len(ids) - 1), "prompt": "p", "response": "r"}
            for i, split, ids in [("c", "train", [1, 7, 8]), ("a", "eval", [1, 2]), ("b", "train", [1, 5]), ("d", "train", [1, 9, 9, 9])]]
    pq.write_table(encode_signals(pa.Table.from_pylist(rows).select(SIGNAL_SCHEMA.names).cast(SIGNAL_SCHEMA)), tmp_path / "part-0.parquet",
                   **PARQUET_WRITE_ARGS)
    write_signal_meta(tmp_path, {"logprob_scale": LOGPROB_SCALE})
    assert calibration_sequences(tmp_path, 2) == [[1, 5], [1, 7, 8]]
    assert calibration_sequences(tmp_path, 10) == [[1, 5], [1, 7, 8], [1, 9, 9, 9]]


def _nll(model, sequences) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            if len(ids) < 2:
                continue
            logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
            total -= logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
            count += len(ids) - 1
    return total / count


def test_drop_one_is_the_nll_of_the_model_built_without_that_layer():
    """Against a model built with one layer fewer and the teacher's other weights (no layer surgery in place)."""
    from transformers import LlamaForCausalLM

    model = _llama(3, seed=2)
    scores = drop_one_nll(model, SEQUENCES)
    for drop in range(3):
        keep = [i for i in range(3) if i != drop]
        config = model.config.to_dict() | {"num_hidden_layers": 2}
        smaller = LlamaForCausalLM(type(model.config).from_dict(config))
        state = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
        for new, old in enumerate(keep):
            prefix = f"model.layers.{old}."
            state |= {k.replace(prefix, f"model.layers.{new}."): v for k, v in model.state_dict().items() if k.startswith(prefix)}
        smaller.load_state_dict(state)
        assert scores[drop] == pytest.approx(_nll(smaller.eval(), SEQUENCES), rel=1e-6)  # float32 log-softmax over a right-padded batch
    # The model is whole again afterwards.
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert _nll(model, SEQUENCES) != pytest.approx(scores[0], rel=1e-6)


@pytest.mark.parametrize("silent", [0, 2])
def test_drop_one_scores_a_layer_that_changes_nothing_at_the_full_models_nll(silent):
    model = _llama(4, seed=3)
    _silence(model, silent)
    scores = drop_one_nll(model, SEQUENCES)
    # Removing a layer that writes nothing leaves the model's function, so its score is the full model's NLL
    # (on random weights another layer's removal may even lower the NLL, so no ranking is asserted).
    assert scores[silent] == pytest.approx(_nll(model, SEQUENCES), rel=1e-6)  # float32 log-softmax over a right-padded batch
    assert all(abs(s - scores[silent]) > 1e-6 for i, s in enumerate(scores) if i != silent)
    with pytest.raises(ValueError, match="calibration sequence"):
        drop_one_nll(model, [[4]])


def test_drop_one_cuts_and_restores_a_config_with_per_layer_attention_types():
    """Gemma 3 keeps a per-layer list of attention types (sliding or full) that the forward pass reads by position."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32, max_position_embeddings=128, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(4)
    model = Gemma3ForCausalLM(config)
    _silence(model, 1)
    types = list(model.config.layer_types)
    scores = drop_one_nll(model, SEQUENCES)
    assert model.config.layer_types == types and len(model.model.layers) == 4
    assert scores[1] == pytest.approx(_nll(model, SEQUENCES), rel=1e-6)  # float32 log-softmax over a right-padded batch
    assert all(abs(s - scores[1]) > 1e-6 for i, s in enumerate(scores) if i != 1)


def test_auto_layers_by_drop_one_are_recorded_with_their_method(tmp_path):
    teacher, model = _saved_teacher(tmp_path, silent=2)
    run = RunDir.of(str(tmp_path / "run"))
    spec = StudentSpec(init="prune_from_teacher", layers="auto", num_layers=3, calibration_rows=2, layer_scoring="drop_one")
    prepare_student(spec, str(teacher), None, run, lambda rows: SEQUENCES[:rows])
    info = json.loads((run.student_init / PRUNE_INFO_FILE).read_text())
    scores = info["selection"]["scores"]
    assert info["selection"]["method"] == "drop_one" and len(scores) == 4
    assert info["kept_layers"] == choose_layers(scores, 3)
    assert scores[2] == pytest.approx(_nll(model, SEQUENCES[:2]), abs=2e-6)  # rounded to 6 places in the record


def test_layer_scoring_is_only_for_auto():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="layer_scoring: only used with layers 'auto'"):
        StudentSpec(init="prune_from_teacher", layers=[0, 1], layer_scoring="drop_one")
    with pytest.raises(ValidationError, match="layer_scoring"):
        StudentSpec(init="prune_from_teacher", layers="auto", num_layers=2, layer_scoring="random")
