"""Reading the prompt corpus into a Ray Dataset of ``{id, split, prompt}`` rows."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from raydistill.data.signals import stable_split
from raydistill.spec import DataSpec

CORPUS_COLUMNS = ("id", "split", "prompt")


class CorpusError(ValueError):
    """A corpus row that cannot be turned into a prompt."""


def parse_jsonl_batch(batch: dict[str, np.ndarray], data: DataSpec) -> dict[str, list]:
    """Stage: raw JSONL lines (``text``, ``path``) -> ``id``, ``split``, ``prompt``.

    Lines are parsed here rather than by ``ray.data.read_json`` so that one malformed line
    produces an error naming its file and content, not an Arrow schema error for the block.
    """
    out: dict[str, list] = {c: [] for c in CORPUS_COLUMNS}
    for line, path in zip(batch["text"], batch["path"]):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}: invalid JSON ({err.msg}) in line {line[:120]!r}") from None
        prompt = row.get(data.prompt_field) if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise CorpusError(f"{path}: row {line[:120]!r} has no non-empty string field {data.prompt_field!r} (data.prompt_field)")
        raw_id = row.get(data.id_field)
        example_id = str(raw_id) if raw_id is not None else "sha-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
        out["id"].append(example_id)
        out["split"].append(stable_split(example_id, data.eval_fraction))
        out["prompt"].append(prompt)
    return out


def read_corpus(data: DataSpec):
    """A lazy Ray Dataset of prompts; the corpus is streamed, never loaded whole."""
    import ray.data

    lines = ray.data.read_text(data.path, include_paths=True)
    return lines.map_batches(parse_jsonl_batch, fn_kwargs={"data": data}, batch_format="numpy")
