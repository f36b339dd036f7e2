"""Fingerprints of a stage's inputs: the spec fields it reads, the models it loads, the corpus, its upstream outputs.

Each input is kept under its own key (``train.lr``, ``model:teacher``, ``corpus``,
``upstream:teacher``) with a short digest, so a re-run can say exactly which inputs changed.
Identities are cheap, like a build system's: a model is its path plus a hash of its config and
tokenizer files and the sizes and modification times of its weights; a corpus is the sizes and
modification times of its files (no content hash, so a terabyte corpus costs a listing).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# Small files that define what a model is, hashed whole; weights are identified by size and mtime.
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_fields(raw: dict, reads: tuple[str, ...], ignores: tuple[str, ...] = ()) -> dict[str, Any]:
    """The spec values under ``reads`` (dotted keys into the dumped spec), flattened to dotted leaves.

    Flattening makes each leaf its own input, so a changed ``train.lr`` is reported as that key.
    ``ignores`` drops keys that change how a stage runs but not what it produces (worker counts,
    checkpoint cadence, ports).
    """
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k in sorted(node):
                walk(f"{prefix}.{k}", node[k])
        elif node is not None:
            # An unset optional key reads as an absent one, so a key added to the spec later
            # (teachers, data.domain_field, ...) leaves the runs made before it up to date.
            out[prefix] = node

    for dotted in reads:
        node: Any = raw
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        walk(dotted, node)
    return {k: v for k, v in out.items() if not any(k == i or k.startswith(i + ".") for i in ignores)}


def model_identity(path: str) -> str:
    d = Path(path)
    if not d.is_dir():
        return digest({"path": path})  # a remote reference: its name is all there is to go on
    files = {}
    for name in _MODEL_FILES:
        f = d / name
        if f.is_file():
            files[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    weights = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(d.iterdir()) if f.suffix in _WEIGHT_SUFFIXES}
    return digest({"path": str(d.resolve()), "files": files, "weights": weights})


def corpus_identity(path_spec: str) -> str:
    """Sizes and modification times of every corpus file (local or on an object store), in order."""
    entries = []
    for part in (p.strip() for p in path_spec.split(",") if p.strip()):
        entries.extend(_file_infos(part))
    return digest(entries)


def _file_infos(part: str) -> list[list]:
    import glob

    import pyarrow.fs as pafs

    if "://" in part:
        fs, root = pafs.FileSystem.from_uri(part)
        info = fs.get_file_info(root)
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True)) if info.type == pafs.FileType.Directory else [info]
        return sorted([i.path, i.size, i.mtime_ns] for i in infos if i.type == pafs.FileType.File)
    out = []
    for match in sorted(glob.glob(part)) or [part]:
        p = Path(match)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out.extend([str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] if f.exists() else [str(f), None, None] for f in files)
    return out


def changed(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The input keys whose digests differ (added or removed keys count as changed)."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
