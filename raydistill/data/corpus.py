"""Reading the corpus and preparing teacher requests, with bad rows rejected rather than fatal.

Two stages over Ray Datasets:

* ``read_records(data)`` -> rows ``{raw, source}``: ``raw`` is the record as bytes (a JSONL or
  text line, a whole text file) or a JSON string (a Parquet row); ``source`` is where it came
  from (``path:line`` or ``path#row``).
* ``RequestBuilder`` -> rows in ``REQUEST_COLUMNS``: the teacher's token ids for the prompt (and,
  in score mode, the response), or a ``reject`` reason. Nothing raises on a bad row.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections import defaultdict
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from raydistill.data.signals import stable_split
from raydistill.spec import DataSpec, TeacherPassSpec

REQUEST_COLUMNS = ("id", "split", "source", "prompt", "response", "prompt_ids", "target_ids", "domain", "reject", "raw")
# Rows per block when streaming a text file; bounds memory regardless of file size.
LINES_PER_BLOCK = 2048
_RAW_SNIPPET = 200


def _expand_paths(path_spec: str) -> list[str]:
    """Comma-separated paths; local globs are expanded here (Ray expands directories itself)."""
    out = []
    for part in (p.strip() for p in path_spec.split(",") if p.strip()):
        if "://" not in part and any(c in part for c in "*?["):
            out.extend(sorted(glob.glob(part)))
        else:
            out.append(part)
    return out


def _line_datasource_cls():
    from ray.data.datasource import FileBasedDatasource

    class LineDatasource(FileBasedDatasource):
        """Streams files as raw byte lines with their line numbers, or whole files as one record.

        Ray's own text reader decodes each file whole and strictly, so one invalid UTF-8 byte
        fails the file and line numbers are lost; here decoding is per record, downstream,
        where a bad record can be rejected with its location.
        """

        def __init__(self, paths, whole_file: bool = False, max_record_bytes: int = 1 << 24, **kwargs):
            super().__init__(paths, **kwargs)
            self.whole_file, self.cap = whole_file, max_record_bytes

        def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
            if self.whole_file:
                data = f.read(self.cap + 1)  # never more than the cap (plus one byte to notice) in memory
                yield _records([data[:_RAW_SNIPPET] if len(data) > self.cap else data], [path], [len(data) if len(data) > self.cap else 0])
                return
            yield from _split_lines(f, path, self.cap)

    return LineDatasource


def _records(raws: list[bytes], sources: list[str], oversize: list[int]) -> pa.Table:
    return pa.table({"raw": pa.array(raws, pa.binary()), "source": sources, "oversize": pa.array(oversize, pa.int64())})


def _split_lines(f, path: str, cap: int) -> Iterator[pa.Table]:
    """Lines of ``f`` as records, in blocks; a line over ``cap`` bytes becomes an ``oversize`` record.

    Pieces of a long line are gathered in a list and joined once (not re-concatenated per chunk),
    and once a line passes the cap only a snippet of it is kept, so memory stays bounded whatever
    the input.
    """
    raws: list[bytes] = []
    sources: list[str] = []
    oversize: list[int] = []
    parts: list[bytes] = []
    size, lineno = 0, 0

    def finish() -> None:
        line = b"".join(parts)
        if size > cap:
            raws.append(line)  # a snippet: see below
            sources.append(f"{path}:{lineno}")
            oversize.append(size)
        elif line.strip():
            raws.append(line)
            sources.append(f"{path}:{lineno}")
            oversize.append(0)

    while chunk := f.read(1 << 20):
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if size <= cap:
                if size + len(piece) > cap:
                    parts = [b"".join(parts + [piece])[:_RAW_SNIPPET]]
                else:
                    parts.append(piece)
            size += len(piece)
            if nl < 0:
                break
            lineno += 1
            finish()
            parts, size, start = [], 0, nl + 1
        if len(raws) >= LINES_PER_BLOCK:
            yield _records(raws, sources, oversize)
            raws, sources, oversize = [], [], []
    if size:
        lineno += 1
        finish()
    if raws:
        yield _records(raws, sources, oversize)


def _parquet_to_records(batch: pa.Table, cap: int) -> pa.Table:
    """Parquet rows -> ``{raw: JSON text, source: path#row}`` so all formats share one parser."""
    paths = batch.column("path").to_pylist()
    rows = batch.drop_columns(["path"]).to_pylist()
    raws = [json.dumps(r, default=str).encode() for r in rows]
    # Ray does not expose a row's index within its file; the id (or content hash) locates it.
    return _records([r if len(r) <= cap else r[:_RAW_SNIPPET] for r in raws], [f"{p}#parquet" for p in paths],
                    [0 if len(r) <= cap else len(r) for r in raws])


def read_records(data: DataSpec):
    """A lazy Ray Dataset of ``{raw, source}`` records; files are streamed, never loaded whole."""
    import ray.data

    paths = _expand_paths(data.path)
    if data.format == "parquet":
        return ray.data.read_parquet(paths, include_paths=True).map_batches(_parquet_to_records, fn_args=(data.max_record_bytes,), batch_format="pyarrow")
    return ray.data.read_datasource(_line_datasource_cls()(paths, whole_file=data.format == "text_files", max_record_bytes=data.max_record_bytes))


_NO_REQUEST = {"id": "", "prompt": "", "response": "", "prompt_ids": [], "target_ids": [], "domain": ""}


class RowError(ValueError):
    """Why one corpus row cannot become a teacher request."""


class RequestBuilder:
    """Ray Data stage: records -> teacher requests (token ids), one output row per input row.

    Holds the teacher's tokenizer, so prompt ids are the teacher's own and the length cap is
    exact. Bad rows come out with ``reject`` set and are never raised.
    """

    def __init__(self, data: DataSpec, teacher_pass: TeacherPassSpec, tokenizer_path: str, max_prompt_tokens: int,
                 domains: dict[str, str] | None = None):
        from transformers import AutoTokenizer

        self.data, self.tp = data, teacher_pass
        self.domains = domains  # domain -> its teacher (teacher_pass.routing: domain), else None
        self.tok = AutoTokenizer.from_pretrained(tokenizer_path)
        self.max_prompt_tokens = max_prompt_tokens

    # -- parsing ---------------------------------------------------------------------------
    def _record(self, raw: bytes) -> dict[str, Any] | str:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RowError(f"invalid UTF-8 at byte {err.start}") from None
        if self.data.format in ("text", "text_files"):
            return text
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            raise RowError(f"invalid JSON: {err.msg} at column {err.colno}") from None
        if not isinstance(row, dict):
            raise RowError(f"expected a JSON object, got {type(row).__name__}")
        return row

    def _field_text(self, row: dict, key: str, required: bool) -> str | None:
        value = row.get(key)
        if value is None:
            if required:
                raise RowError(f"missing field {key!r}")
            return None
        if not isinstance(value, str):
            raise RowError(f"field {key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise RowError(f"field {key!r} is empty")
        return value

    def _render_chat(self, messages: list[dict]) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise RowError("chat messages given but the teacher's tokenizer has no chat template")
        if self.tp.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.tp.system_prompt}, *messages]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=self.tp.mode == "generate")

    def _prompt_text(self, record) -> tuple[str, str | None]:
        """(prompt text as the teacher sees it, given response or None)."""
        if isinstance(record, str):
            if not record.strip():
                raise RowError("empty document")
            return record, None
        messages = record.get(self.data.messages_field)
        if record.get(self.data.prompt_field) is None and messages is not None:
            if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages) or not messages:
                raise RowError(f"field {self.data.messages_field!r} must be a non-empty list of {{role, content}} objects")
            return self._render_chat(messages), self._field_text(record, self.data.response_field, required=False)
        prompt = self._field_text(record, self.data.prompt_field, required=True)
        use_template = self.tp.chat_template if self.tp.chat_template is not None else bool(self.tp.system_prompt)
        if use_template:
            prompt = self._render_chat([{"role": "user", "content": prompt}])
        return prompt, self._field_text(record, self.data.response_field, required=False)

    def _row_id(self, record, source: str) -> str:
        if isinstance(record, dict) and record.get(self.data.id_field) is not None:
            return str(record[self.data.id_field])
        key = source if not source.endswith("#parquet") else source + json.dumps(record, sort_keys=True, default=str)
        return "row-" + hashlib.sha256(key.encode()).hexdigest()[:16]

    # -- one row ------------------------------------------------------------------------------
    def build(self, raw: bytes, source: str) -> dict[str, Any]:
        record = self._record(raw)
        example_id = self._row_id(record, source)
        prompt, response = self._prompt_text(record)
        prompt_ids = self.tok(prompt).input_ids
        # A given response is encoded on its own and appended, so its ids are exactly the
        # tokenizer's encoding of the response text (no merges across the boundary).
        target_ids = self.tok(response, add_special_tokens=False).input_ids if response is not None else []
        if self.tp.mode == "score" and response is None and isinstance(record, dict):
            raise RowError(f"score mode needs field {self.data.response_field!r} (or a text corpus)")
        n_tokens = len(prompt_ids) + len(target_ids)
        if n_tokens > self.max_prompt_tokens:
            raise RowError(f"{n_tokens} tokens exceeds the limit of {self.max_prompt_tokens} (data.max_prompt_tokens)")
        if self.tp.mode == "score" and n_tokens < 2:
            raise RowError("text has no token to score after BOS")
        return {"id": example_id, "prompt": prompt, "response": response or "", "prompt_ids": prompt_ids, "target_ids": target_ids,
                "domain": self._domain(record)}

    def _domain(self, record) -> str:
        """The row's domain (``data.domain_field``, a string); with rows routed by domain, one that some teacher lists."""
        if self.data.domain_field is None:
            return ""
        domain = record.get(self.data.domain_field) if isinstance(record, dict) else None
        if not isinstance(domain, str):
            raise RowError(f"field {self.data.domain_field!r} (data.domain_field) is missing or not a string")
        if self.domains is not None and domain not in self.domains:
            raise RowError(f"domain {domain!r} has no teacher (teachers' domains: {', '.join(sorted(self.domains))})")
        return domain

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in REQUEST_COLUMNS}
        for raw, source, oversize in zip(batch["raw"], batch["source"], batch["oversize"]):
            raw = bytes(raw)
            try:
                if oversize:
                    raise RowError(f"record is {int(oversize)} bytes, over the limit of {self.data.max_record_bytes} (data.max_record_bytes)")
                row = self.build(raw, source)
                reject = ""
            except RowError as err:
                row, reject = dict(_NO_REQUEST), str(err)
            except Exception as err:  # noqa: BLE001 - one row's failure (a chat template that raises, JSON nested too deep) is that row's reject
                row, reject = dict(_NO_REQUEST), f"{type(err).__name__}: {str(err)[:300]}"
            row.update(split=stable_split(row["id"], self.data.eval_fraction) if row["id"] else "", source=source, reject=reject,
                       raw="" if not reject else raw[:_RAW_SNIPPET].decode("utf-8", errors="replace"))
            for c in REQUEST_COLUMNS:
                out[c].append(row[c])
        return out


def _record_ids(batch: pa.Table, id_field: str) -> pa.Table:
    """``{id, source}`` of the records that carry their own id; others get one from their location, unique by construction."""
    ids, sources = [], []
    for raw, source, oversize in zip(batch["raw"].to_pylist(), batch["source"].to_pylist(), batch["oversize"].to_pylist()):
        if oversize:
            continue
        try:
            row = json.loads(raw)
        except Exception:  # noqa: BLE001 - a bad record is rejected later, with its reason
            continue
        if isinstance(row, dict) and row.get(id_field) is not None:
            ids.append(str(row[id_field]))
            sources.append(source)
    return pa.table({"id": pa.array(ids, pa.string()), "source": pa.array(sources, pa.string())})


def _id_hashes(ids: list[str]) -> np.ndarray:
    # blake2b, not hash(): Python's string hash differs between worker processes.
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids), np.uint64, len(ids))


def _hashed_ids(batch: pa.Table, id_field: str, with_ids: bool) -> pa.Table:
    ids = _record_ids(batch, id_field)
    hashes = pa.array(_id_hashes(ids["id"].to_pylist()))
    return ids.append_column("h", hashes) if with_ids else pa.table({"h": hashes})


# Up to this many bytes of local JSONL, the duplicate-id pass reads the files on the driver (``duplicate_ids``).
DRIVER_ID_PASS_BYTES = 32 << 20


def _small_local_jsonl(data: DataSpec) -> list[str] | None:
    """The corpus's files (absolute paths, as Ray's reader names them), if it is local JSONL files of at most
    ``DRIVER_ID_PASS_BYTES`` in all; else None."""
    if data.format != "jsonl":
        return None
    paths = _expand_paths(data.path)
    if not paths or any("://" in p or not os.path.isfile(p) for p in paths):
        return None
    if sum(os.path.getsize(p) for p in paths) > DRIVER_ID_PASS_BYTES:
        return None
    return [os.path.abspath(p) for p in paths]


def _local_records(path: str, cap: int) -> Iterator[pa.Table]:
    with open(path, "rb") as f:
        yield from _split_lines(f, path, cap)


def duplicate_ids(data: DataSpec, shown: int = 10) -> list[tuple[str, list[str]]]:
    """Ids that several corpus records carry, each with where it occurs (``file:line``), the first ``shown`` by id.

    A pass over the records that parses only their ids (no tokenizing), so it runs before any
    engine starts. Text corpora have no id field: their ids are their locations.
    Why not Ray Data's ``groupby``: its hash shuffle's worker processes took 20 s on a 2-core
    machine for a 1,024-row corpus, and every engine start waited for them. Here one streaming
    pass sends the driver an 8-byte hash per record, ``np.unique`` finds repeated hashes, and
    only when there are some does a second pass collect those records' ids and sources (which
    also tells a hash collision from a repeated id).
    """
    if data.format in ("text", "text_files"):
        return []
    local = _small_local_jsonl(data)
    if local is not None:
        # On the driver: Ray Data's first tasks wait for cold worker processes (2-5 s on a 2-core machine),
        # and the engines start only after this check; the same parser, on a few MiB, takes milliseconds.
        blocks = [b for path in local for b in _local_records(path, data.max_record_bytes)]

    def hashed(with_ids: bool):
        if local is not None:
            return (_hashed_ids(b, data.id_field, with_ids) for b in blocks)
        return read_records(data).map_batches(_hashed_ids, fn_args=(data.id_field, with_ids), batch_format="pyarrow").iter_batches(
            batch_format="pyarrow", batch_size=None)

    hashes = [b["h"].to_numpy() for b in hashed(False) if b.num_rows]
    values, counts = np.unique(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64), return_counts=True)
    suspects = values[counts > 1]
    if not len(suspects):
        return []
    sources: dict[str, list[str]] = defaultdict(list)
    for b in hashed(True):
        hit = b.filter(pa.array(np.isin(b["h"].to_numpy(), suspects)))
        for i, s in zip(hit["id"].to_pylist(), hit["source"].to_pylist()):
            sources[i].append(s)
    return sorted((i, sorted(s)) for i, s in sources.items() if len(s) > 1)[:shown]


def prepare_requests(data: DataSpec, teacher_pass: TeacherPassSpec, tokenizer_path: str, max_prompt_tokens: int,
                     domains: dict[str, str] | None = None):
    """Lazy Dataset of teacher requests (``REQUEST_COLUMNS``), bad rows marked in ``reject``. ``domains`` (domain ->
    teacher): rows are routed by ``data.domain_field``, and a row whose domain no teacher lists is a bad row."""
    import ray.data

    return read_records(data).map_batches(
        RequestBuilder,
        fn_constructor_kwargs={"data": data, "teacher_pass": teacher_pass, "tokenizer_path": tokenizer_path, "max_prompt_tokens": max_prompt_tokens,
                               "domains": domains},
        batch_format="numpy",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, (os.cpu_count() or 2) // 2)),
        num_cpus=0.5,
    )
