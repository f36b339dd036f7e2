"""Several teachers (``teachers:``): the teacher pass per ``teacher_pass.routing``.

* ``domain``: the corpus is read and checked once per teacher; each teacher's pass takes the rows of
  its domains, on its own engine pool, and writes into the one signals directory with ``teacher`` and
  ``domain`` columns (``raydistill.data.signals.ROUTING_COLUMNS``). A row whose domain no teacher
  lists is a bad row (``RequestBuilder``), rejected with that reason or failing the job under
  ``data.on_bad_row: fail``.
* ``ensemble``: each teacher's own signals are a complete signals directory under
  ``signals/teachers/<name>/``. The first teacher runs the single-teacher pass (it writes the
  responses in generate mode); every other teacher then scores those exact token ids (score mode
  over the first teacher's ``input_ids``). The top-level shards are then the weighted mixture of the
  teachers at every position (``raydistill.teacher.ensemble.mix_topk``: union of their top-k plus
  an exact tail, padded with masked entries), rewritten whole after every pass, which is cheap next
  to the engines and never leaves a stale mixture behind.

Each teacher's directory resumes on its own (the shards it completed are kept), so a killed
ensemble pass re-run scores only what is missing and mixes every row exactly once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydistill.data.signals import (FULL_SIGNAL_COLUMNS, PARQUET_WRITE_ARGS, encode_signals, learn_signal_codec, load_signals, read_signal_meta, shard_files,
                                     update_signal_meta)
from raydistill.spec import DataSpec, TeacherEntry, TeacherPassSpec, domain_owners
from raydistill.teacher import stage as single
from raydistill.teacher.stage import REJECTED_FILE as REJECTED_FILE_NAME

TEACHERS_DIR = "teachers"
_REQUEST_FROM_SIGNALS = ["id", "split", "prompt", "response", "input_ids", "target_start"]


def teachers_meta(teachers: list[TeacherEntry], paths: list[str], routing: str) -> dict:
    """What ``_signals.json`` records of several teachers: the routing, and each teacher's name, model, weight and domains."""
    return {"routing": routing,
            "teachers": [{"name": t.name, "model": t.model, "path": p, "weight": t.weight, "domains": list(t.domains)} for t, p in zip(teachers, paths)]}


def check_shared_tokenizer(teachers: list[TeacherEntry], paths: list[str]) -> str:
    """The teachers' tokenizer fingerprint; a ``ValueError`` naming each teacher whose tokenizer differs from the first's."""
    prints = [single.teacher_fingerprint(p) for p in paths]
    wrong = [f"teachers[{i}] ({t.name!r}, {t.model})" for i, (t, fp) in enumerate(zip(teachers, prints)) if fp != prints[0]]
    if wrong:
        raise ValueError(f"teachers: {', '.join(wrong)} tokenize differently from teachers[0] ({teachers[0].name!r}); "
                         "several teachers must share one tokenizer (their signals hold token ids)")
    return prints[0]


def run_multi_teacher_stage(data: DataSpec, teachers: list[TeacherEntry], teacher_pass: TeacherPassSpec, paths: list[str], signals_dir: str) -> dict:
    fingerprint = check_shared_tokenizer(teachers, paths)
    if teacher_pass.routing == "domain":
        return run_domain_pass(data, teachers, teacher_pass, paths, signals_dir, fingerprint)
    return run_ensemble_pass(data, teachers, teacher_pass, paths, signals_dir, fingerprint)


# --------------------------------------------------------------------------- routing: domain


def run_domain_pass(data: DataSpec, teachers: list[TeacherEntry], teacher_pass: TeacherPassSpec, paths: list[str], signals_dir: str,
                    fingerprint: str) -> dict:
    from raydistill.data.corpus import prepare_requests

    single.check_unique_ids(data)
    meta = {**single._meta(teachers[0].as_teacher(), teacher_pass, paths[0], fingerprint), **teachers_meta(teachers, paths, "domain")}
    done = single._prepare_signals_dir(signals_dir, meta)
    if done:
        print(f"[teacher] resuming: {len(done)} rows already in {signals_dir}", flush=True)
    # One tokenizer (checked above), so the first teacher's prepares every row; the length cap is the tightest teacher's.
    cap = min(single.max_prompt_tokens(data, t.as_teacher(), teacher_pass, p) for t, p in zip(teachers, paths))
    requests = prepare_requests(data, teacher_pass, paths[0], cap, domains=domain_owners(teachers))
    good = single.good_requests(requests, data, signals_dir)
    engines, rows = [], {}
    for t, path in zip(teachers, paths):
        mine = frozenset(t.domains)
        print(f"[teacher] {t.name} ({t.model}): rows of {', '.join(sorted(mine))}", flush=True)
        engines.append(single.signal_pass(good.filter(lambda r, mine=mine: r["domain"] in mine), t.as_teacher(), teacher_pass, path, signals_dir, done,
                                          teacher_name=t.name, domain=True))
    out = single.finish_pass(signals_dir, engines, done)
    counts = pq.ParquetDataset(shard_files(signals_dir)).read(columns=["teacher"])["teacher"].value_counts().to_pylist() if out["rows"] else []
    rows = {c["values"]: c["counts"] for c in counts}
    out["rows_by_teacher"] = {t.name: rows.get(t.name, 0) for t in teachers}
    return out


# --------------------------------------------------------------------------- routing: ensemble


def run_ensemble_pass(data: DataSpec, teachers: list[TeacherEntry], teacher_pass: TeacherPassSpec, paths: list[str], signals_dir: str,
                      fingerprint: str) -> dict:
    root = Path(signals_dir)
    meta = {**single._meta(teachers[0].as_teacher(), teacher_pass, paths[0], fingerprint), **teachers_meta(teachers, paths, "ensemble")}
    single._prepare_signals_dir(signals_dir, meta)  # a changed setting starts everything below afresh
    dirs = [str(root / TEACHERS_DIR / t.name) for t in teachers]
    print(f"[teacher] {teachers[0].name} ({teachers[0].model}) writes the {'responses' if teacher_pass.mode == 'generate' else 'scores'}", flush=True)
    per_teacher = {teachers[0].name: single.run_teacher_stage(data, teachers[0].as_teacher(), teacher_pass, paths[0], dirs[0])}
    scoring = teacher_pass.model_copy(update={"mode": "score"})
    for t, path, d in zip(teachers[1:], paths[1:], dirs[1:]):
        print(f"[teacher] {t.name} ({t.model}) scores {teachers[0].name}'s tokens", flush=True)
        per_teacher[t.name] = score_pass(dirs[0], t, scoring, path, d, fingerprint)
    out = mix_signal_dirs(dirs, [t.name for t in teachers], [t.weight for t in teachers], signals_dir)
    print(f"[teacher] {out['rows']} mixed signal rows ({out['eval_rows']} held out) in {signals_dir}; {out['rejected_rows']} rejected", flush=True)
    return {**out, "teachers": per_teacher}


def score_pass(responses_dir: str, teacher: TeacherEntry, scoring: TeacherPassSpec, teacher_path: str, signals_dir: str, fingerprint: str) -> dict:
    """``teacher`` scores the token ids of the signals in ``responses_dir`` into ``signals_dir`` (resumable like any pass)."""
    import ray.data

    responses = read_signal_meta(responses_dir)
    meta = {**single._meta(teacher.as_teacher(), scoring, teacher_path, fingerprint),
            # Scores of other responses are not these: a first teacher that started afresh restarts this one.
            "responses_from": {k: responses.get(k) for k in ("teacher", "teacher_path", "mode", "sampling", "system_prompt")}}
    done = single._prepare_signals_dir(signals_dir, meta)
    if done:
        print(f"[teacher] resuming: {len(done)} rows already in {signals_dir}", flush=True)
    requests = ray.data.read_parquet(shard_files(responses_dir), columns=_REQUEST_FROM_SIGNALS).map_batches(requests_from_signals, batch_format="pyarrow")
    engines = single.signal_pass(requests, teacher.as_teacher(), scoring, teacher_path, signals_dir, done)
    return single.finish_pass(signals_dir, [engines], done)


def requests_from_signals(table: pa.Table) -> pa.Table:
    """Signal rows -> score-mode teacher requests over exactly their token ids (``REQUEST_COLUMNS``)."""
    ids, starts = table["input_ids"].to_pylist(), table["target_start"].to_pylist()
    n = table.num_rows
    return pa.table({
        "id": table["id"], "split": table["split"], "source": table["id"], "prompt": table["prompt"], "response": table["response"],
        "prompt_ids": pa.array([x[:s] for x, s in zip(ids, starts)], pa.list_(pa.int32())),
        "target_ids": pa.array([x[s:] for x, s in zip(ids, starts)], pa.list_(pa.int32())),
        "domain": pa.array([""] * n, pa.string()), "reject": pa.array([""] * n, pa.string()), "raw": pa.array([""] * n, pa.string()),
    })


def _positions(table: pa.Table, column: str) -> np.ndarray:
    """A list<list<x>> column (k per position) -> [P, k]; a list<x> column -> [P]."""
    values = pc.list_flatten(table[column].combine_chunks())
    if not pa.types.is_list(values.type):
        return values.to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    k = int(lengths.max()) if len(lengths) else 1
    return pc.list_flatten(values).to_numpy(zero_copy_only=False).reshape(-1, k)


def mix_rows(tables: list[pa.Table], weights: list[float]) -> pa.Table:
    """The teachers' decoded signal rows, the same ids in the same order -> the mixture's rows (``FULL_SIGNAL_SCHEMA``)."""
    from raydistill.teacher.ensemble import mix_logprobs, mix_topk

    first = tables[0]
    mixed_ids, mixed_lps = mix_topk([_positions(t, "topk_ids") for t in tables], [_positions(t, "topk_logprobs") for t in tables], weights)
    target = mix_logprobs([_positions(t, "target_logprob") for t in tables], weights)
    outer = first["topk_ids"].combine_chunks().offsets
    width = mixed_ids.shape[1]
    inner = pa.array(np.arange(len(mixed_ids) + 1, dtype=np.int32) * width)
    nested = lambda values: pa.ListArray.from_arrays(outer, pa.ListArray.from_arrays(inner, pa.array(values.reshape(-1))))  # noqa: E731
    columns = {c: first[c] for c in ("id", "split", "input_ids", "target_start", "prompt", "response")}
    columns.update(topk_ids=nested(mixed_ids.astype(np.int32)), topk_logprobs=nested(mixed_lps.astype(np.float32)),
                   target_logprob=pa.ListArray.from_arrays(outer, pa.array(target.astype(np.float32))))
    return pa.table({c: columns[c] for c in FULL_SIGNAL_COLUMNS} | ({"domain": first["domain"]} if "domain" in first.column_names else {}))


def _align(first: pa.Table, other: pa.Table) -> tuple[pa.Table, list[int]]:
    """``other``'s rows in ``first``'s id order, and the positions in ``first`` it cannot match (no row, or other tokens)."""
    where = {i: n for n, i in enumerate(other["id"].to_pylist())}
    first_ids, first_tokens = first["id"].to_pylist(), first["input_ids"].to_pylist()
    other_tokens = other["input_ids"].to_pylist()
    take, missing = [], []
    for n, (i, tokens) in enumerate(zip(first_ids, first_tokens)):
        j = where.get(i)
        if j is None or other_tokens[j] != tokens:
            missing.append(n)
        else:
            take.append(j)
    return other.take(pa.array(take, pa.int64())), missing


def mix_signal_dirs(dirs: list[str], names: list[str], weights: list[float], out_dir: str) -> dict:
    """Write the mixture of the teachers' signals (``dirs``, the first one's rows and token ids) as ``out_dir``'s shards.

    Shard by shard of the first teacher, so memory holds one shard per teacher. A row that some
    teacher has no signal for (its engine rejected it) is rejected here with the reason.
    """
    out = Path(out_dir)
    for old in out.glob("*.parquet"):
        old.unlink()
    codec = None  # the mixture's own entropy models (its union of ids and its widths), learned from its first shard
    rejected = [json.loads(l) for l in (Path(dirs[0]) / REJECTED_FILE_NAME).read_text().splitlines() if l.strip()] if (Path(dirs[0]) / REJECTED_FILE_NAME).exists() else []
    rows = evals = 0
    labels = ["domain"] if "domain" in pq.ParquetDataset(shard_files(dirs[0])).schema.names else []  # the first teacher's rows keep theirs
    for n, shard in enumerate(shard_files(dirs[0])):
        tables = [load_signals(dirs[0], FULL_SIGNAL_COLUMNS + labels, files=[shard])]
        keep = np.ones(tables[0].num_rows, bool)
        for d, name in zip(dirs[1:], names[1:]):
            other, missing = _align(tables[0], load_signals(d, FULL_SIGNAL_COLUMNS, ids=tables[0]["id"]))
            tables.append(other)
            keep[missing] = False
            rejected += [{"source": i, "id": i, "reason": f"teacher {name!r} has no signal for these tokens (see {d}/{REJECTED_FILE_NAME})"}
                         for i in np.asarray(tables[0]["id"].to_pylist(), object)[missing]]
        if not keep.all():
            mask = pa.array(keep)
            tables = [tables[0].filter(mask)] + [_refilter(t, tables[0], keep) for t in tables[1:]]
        if not tables[0].num_rows:
            continue
        mixed = mix_rows(tables, weights)
        tmp = out / f".mix-{n:05d}.parquet.tmp"
        if codec is None:
            codec = learn_signal_codec(mixed)
            update_signal_meta(out_dir, signal_codec=codec.to_json())  # before any shard that uses it
        pq.write_table(encode_signals(mixed, codec=codec), tmp, **PARQUET_WRITE_ARGS)
        os.replace(tmp, out / f"mix-{n:05d}.parquet")
        splits = mixed["split"].to_pylist()
        rows, evals = rows + len(splits), evals + splits.count("eval")
    train = rows - evals
    target = out / REJECTED_FILE_NAME
    if rejected:
        target.write_text("".join(json.dumps(r) + "\n" for r in sorted(rejected, key=lambda r: str(r.get("source")))))
    elif target.exists():
        target.unlink()
    return {"signals_dir": out_dir, "rows": rows, "train_rows": train, "eval_rows": evals, "rejected_rows": len(rejected)}


def _refilter(aligned: pa.Table, first: pa.Table, keep: np.ndarray) -> pa.Table:
    """``aligned`` holds only the rows of ``first`` it matched; keep those that every teacher matched."""
    ids = set(first.filter(pa.array(keep))["id"].to_pylist())
    return aligned.filter(pc.is_in(aligned["id"], pa.array(sorted(ids), pa.string())))


# --------------------------------------------------------------------------- validate


def corpus_domain_errors(data: DataSpec, teachers: list[TeacherEntry], shown: int = 10) -> list[str]:
    """routing: domain, local jsonl/parquet corpora: each domain the corpus uses that no teacher lists, with where it first occurs.

    ``validate`` runs this before any engine starts; the teacher pass still rejects such rows one by one
    (object-store corpora are only checked there).
    """
    from raydistill.data.corpus import _expand_paths

    owners = domain_owners(teachers)
    first_seen: dict[str, str] = {}
    for path in _expand_paths(data.path):
        if "://" in path:
            continue
        files = sorted(str(f) for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else [path]
        for f in files:
            for where, domain in _domains_in(f, data):
                if domain not in owners and domain not in first_seen:
                    first_seen[domain] = where
                    if len(first_seen) >= shown:
                        break
    field = data.domain_field
    return [f"data.domain_field: {field} {d!r} (first at {w}) has no teacher; list it in some teachers[].domains" for d, w in first_seen.items()]


def _domains_in(path: str, data: DataSpec):
    """(location, domain) of each row of a jsonl or parquet file; rows without a string domain are the pass's to reject."""
    if data.format == "parquet" or path.endswith(".parquet"):
        try:
            values = pq.read_table(path, columns=[data.domain_field])[data.domain_field].to_pylist()
        except (pa.ArrowInvalid, KeyError, OSError):
            return
        yield from ((f"{path} row {i}", v) for i, v in enumerate(values) if isinstance(v, str))
        return
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get(data.domain_field), str):
                yield f"{path}:{n}", row[data.domain_field]


def student_tokenizer_errors(teachers: list[TeacherEntry], paths: list[str], student_path: str | None) -> list[str]:
    """Each teacher whose tokenizer differs from the student's (the signals' token ids must be the student's)."""
    if student_path is None:  # a student pruned from the first teacher has its tokenizer
        student_path = paths[0]
    want = single.teacher_fingerprint(student_path)
    return [f"teachers[{i}].model: {t.model} ({t.name!r}) does not share the student's tokenizer (fingerprint differs)"
            for i, (t, p) in enumerate(zip(teachers, paths)) if single.teacher_fingerprint(p) != want]
