"""The teacher-signal contract: Parquet files under ``RUN/signals/``, one row per example.

Columns (``SIGNAL_SCHEMA``):

==============  ==========================  =====================================================
column          type                        meaning
==============  ==========================  =====================================================
id              string                      stable example id from the corpus (or a prompt hash)
split           string                      ``train`` or ``eval`` (stable hash split on ``id``)
input_ids       list<int32>                 the teacher's token ids of prompt + response (BOS first)
target_start    int32                       index of the first target (trained) token in input_ids
topk_ids        list<list<int32>>           per target position t >= target_start: the teacher's
                                            top-k token ids for input_ids[t], most likely first
topk_logprobs   list<list<float32>>         their raw (T=1) log-probs, same shape as topk_ids
prompt          string                      prompt text, for reports only
response        string                      response text, for reports only; never re-tokenized
==============  ==========================  =====================================================

``len(topk_ids) == len(input_ids) - target_start``. The tail mass at a position is implicit:
``1 - sum(exp(topk_logprobs))``. Training and evaluation read ``input_ids`` (the teacher's
own ids), never the text, so nothing is detokenized and re-tokenized on the way.

File-level metadata is written to ``signals/_signals.json`` next to the shards (teacher,
tokenizer fingerprint, k, mode, sampling). Ray Data writes the shards in parallel and keeps no
per-file Arrow schema metadata, so the sidecar is the one place the description lives.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
META_FILE = "_signals.json"

SIGNAL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("target_start", pa.int32()),
        ("topk_ids", pa.list_(pa.list_(pa.int32()))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("prompt", pa.string()),
        ("response", pa.string()),
    ]
)
SIGNAL_COLUMNS = SIGNAL_SCHEMA.names


class SignalMismatchError(ValueError):
    """Signals that cannot be used with the given student (wrong tokenizer, unknown version)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides token ids: the vocabulary and the special-token ids.

    Two tokenizers with the same fingerprint map text to the same ids, so signals made with one
    are valid for a student using the other.
    """
    h = hashlib.sha256()
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        h.update(f"{name}={getattr(tokenizer, name, None)}\n".encode())
    return h.hexdigest()[:16]


def write_signal_meta(signals_dir: str | Path, meta: dict) -> None:
    Path(signals_dir).mkdir(parents=True, exist_ok=True)
    (Path(signals_dir) / META_FILE).write_text(json.dumps({"schema_version": SCHEMA_VERSION, **meta}, indent=2))


def read_signal_meta(signals_dir: str | Path) -> dict:
    path = Path(signals_dir) / META_FILE
    if not path.exists():
        raise SignalMismatchError(f"{signals_dir}: no {META_FILE}; these are not raydistill teacher signals")
    meta = json.loads(path.read_text())
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise SignalMismatchError(f"{path}: schema_version {meta.get('schema_version')} is not {SCHEMA_VERSION}")
    return meta


def check_tokenizer_matches(signals_dir: str | Path, tokenizer, who: str = "student") -> dict:
    """Refuse signals made with a different tokenizer than ``tokenizer``'s: their ids would mean other tokens."""
    meta = read_signal_meta(signals_dir)
    fp = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer_fingerprint"] != fp:
        raise SignalMismatchError(
            f"signals in {signals_dir} were made with tokenizer {meta['tokenizer_fingerprint']}, "
            f"but the {who}'s tokenizer is {fp}; the {who} must use the teacher's tokenizer"
        )
    return meta


def stable_split(example_id: str, eval_fraction: float) -> str:
    """'eval' for a stable ``eval_fraction`` share of ids, else 'train'."""
    bucket = int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def collate(rows: dict[str, np.ndarray], max_seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch of signal rows -> padded arrays for the student.

    Returns input_ids/attention_mask [B, T], and for the M target tokens of the batch (flattened,
    row-major): ``pred_pos`` [M, 2] (row, position whose logits predict the target), ``targets`` [M],
    ``topk_ids`` [M, K], ``topk_logprobs`` [M, K]. Sequences longer than ``max_seq_len`` are cut
    from the right, dropping their last targets.
    """
    seqs = [np.asarray(s, dtype=np.int64)[:max_seq_len] for s in rows["input_ids"]]
    width = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    pred_pos, targets, topk_ids, topk_lp = [], [], [], []
    for b, (seq, start, ids, lps) in enumerate(zip(seqs, rows["target_start"], rows["topk_ids"], rows["topk_logprobs"])):
        input_ids[b, : len(seq)] = seq
        mask[b, : len(seq)] = 1
        start = int(start)
        # Position t's token is predicted by the logits at t - 1; position 0 (BOS) is never a target.
        for t in range(max(start, 1), len(seq)):
            j = t - start
            pred_pos.append((b, t - 1))
            targets.append(seq[t])
            topk_ids.append(np.asarray(ids[j], dtype=np.int64))
            topk_lp.append(np.asarray(lps[j], dtype=np.float32))
    k = len(topk_ids[0]) if topk_ids else 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pred_pos": np.asarray(pred_pos, dtype=np.int64).reshape(-1, 2),
        "targets": np.asarray(targets, dtype=np.int64),
        "topk_ids": np.stack(topk_ids) if topk_ids else np.zeros((0, k), np.int64),
        "topk_logprobs": np.stack(topk_lp) if topk_lp else np.zeros((0, k), np.float32),
    }
