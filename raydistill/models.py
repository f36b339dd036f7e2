"""Model references: a Hugging Face directory, or a builtin that raydistill builds locally.

Builtins exist because our machines reach no model hub. ``tiny:teacher`` and ``tiny:student``
are small random Llama models sharing one byte-level BPE tokenizer trained here; they are
built on first use into a cache directory and reused afterwards.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "tiny:"
TINY_VERSION = "v2"

# vLLM's CPU attention rejects head_dim 16, so heads are 64 wide (hidden 128, 2 heads).
_TINY_SHAPES = {
    "teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
    "student": dict(hidden_size=128, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
}
TINY_VOCAB = 512
TINY_MAX_POSITIONS = 1024


def is_builtin_model(ref: str) -> bool:
    return ref.startswith(BUILTIN_PREFIX)


def cache_dir() -> Path:
    return Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill"))


def resolve_model(ref: str) -> str:
    """Return a local directory for ``ref``, building a builtin model on first use."""
    if not is_builtin_model(ref):
        return ref
    name = ref[len(BUILTIN_PREFIX):]
    if name not in _TINY_SHAPES:
        raise ValueError(f"unknown builtin model {ref!r}; known: {', '.join(BUILTIN_PREFIX + n for n in _TINY_SHAPES)}")
    root = cache_dir() / f"tiny-{TINY_VERSION}"
    target = root / name
    if not (target / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        # Several processes (pytest workers, Ray actors) may ask at once; one builds, the rest wait.
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").exists():
                build_tiny_models(root)
    return str(target)


def _tokenizer_corpus() -> list[str]:
    corpus = Path(__file__).parent / "assets" / "tokenizer_corpus.txt"
    return corpus.read_text().splitlines()


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # Like Llama, the tokenizer itself prepends BOS, so vLLM and transformers agree on ids.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=TINY_MAX_POSITIONS,
        # A plain role-prefixed template, so chat (`messages`) corpora work with the tiny models.
        chat_template=(
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}"
        ),
    )


def build_tiny_models(root: Path) -> None:
    """Build ``root/teacher`` and ``root/student`` atomically (written to a temp dir, then renamed)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    for name, shape in _TINY_SHAPES.items():
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_MAX_POSITIONS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            # A wide init makes the random teacher's distributions peaked, closer to a trained LM's.
            initializer_range=0.2 if name == "teacher" else 0.02,
            dtype="float32",
            **shape,
        )
        torch.manual_seed(0 if name == "teacher" else 1)
        model = LlamaForCausalLM(config)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        (tmp / "raydistill_builtin.json").write_text(json.dumps({"builtin": BUILTIN_PREFIX + name, "version": TINY_VERSION}))
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
