"""Student initialization: depth pruning of a tiny teacher built in-test (no Ray)."""

import json

import pytest
import torch

from raydistill.distill.init import PRUNE_INFO_FILE, kept_layers, prepare_student, prune_from_teacher
from raydistill.models import build_tiny_tokenizer
from raydistill.spec import StudentSpec
from raydistill.jobs.rundir import RunDir


def _save_teacher(path, config, model_cls):
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(path, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama-teacher")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False)
    return path, _save_teacher(path, config, LlamaForCausalLM)


def test_kept_layers():
    assert kept_layers(6, every_nth=2) == [0, 2, 4, 5]
    assert kept_layers(18, every_nth=3) == [0, 3, 6, 9, 12, 15, 17]
    assert kept_layers(6, layers=[0, 3, -1]) == [0, 3, 5]
    with pytest.raises(ValueError, match="out of range"):
        kept_layers(6, layers=[0, 6])
    with pytest.raises(ValueError, match="ascending"):
        kept_layers(6, layers=[3, 1])


def test_pruned_llama_keeps_the_chosen_layers_and_loads(llama_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, teacher = llama_teacher
    info = prune_from_teacher(str(path), str(tmp_path / "student"), layers=[0, 2, 5])
    assert info["kept_layers"] == [0, 2, 5] and info["teacher_layers"] == 6
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 3
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 5]):
        for name, value in s.items():
            if name.startswith(f"model.layers.{new}."):
                assert torch.equal(value, t[name.replace(f"layers.{new}.", f"layers.{old}.", 1)])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name])
    assert AutoTokenizer.from_pretrained(tmp_path / "student")("the river").input_ids == AutoTokenizer.from_pretrained(path)("the river").input_ids
    # Keeping every layer reproduces the teacher exactly.
    prune_from_teacher(str(path), str(tmp_path / "full"), every_nth=1)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, teacher.eval()(ids).logits)


def test_pruned_gemma3_cuts_layer_types(tmp_path):
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32, max_position_embeddings=128, sliding_window=16,
                              layer_types=["sliding_attention"] * 5 + ["full_attention"])
    _save_teacher(tmp_path / "teacher", config, Gemma3ForCausalLM)
    prune_from_teacher(str(tmp_path / "teacher"), str(tmp_path / "student"), layers=[0, 3, 5])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 3
    assert student.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    with torch.no_grad():
        assert torch.isfinite(student(torch.tensor([[1, 2, 3]])).logits).all()


def test_prepare_student_reuses_an_identical_pruning(llama_teacher, tmp_path):
    path, _ = llama_teacher
    spec = StudentSpec(init="prune_from_teacher", every_nth=2)
    out = prepare_student(spec, str(path), None, RunDir(tmp_path))
    assert out == str(tmp_path / "student_init")
    stamp = (tmp_path / "student_init" / "model.safetensors").stat().st_mtime_ns
    assert prepare_student(spec, str(path), None, RunDir(tmp_path)) == out
    assert (tmp_path / "student_init" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "student_init" / PRUNE_INFO_FILE).read_text())["kept_layers"] == [0, 2, 4, 5]
    assert prepare_student(StudentSpec(model=str(path)), str(path), str(path), RunDir(tmp_path)) == str(path)


def test_student_spec_errors():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="required when init is 'pretrained'"):
        StudentSpec()
    with pytest.raises(ValidationError, match="exactly one of layers or every_nth"):
        StudentSpec(init="prune_from_teacher")
    with pytest.raises(ValidationError, match="exactly one of layers or every_nth"):
        StudentSpec(init="prune_from_teacher", layers=[0], every_nth=2)
    with pytest.raises(ValidationError, match="only used when init"):
        StudentSpec(model="tiny:student", every_nth=2)
