"""Corpus records without Ray: bounded line splitting, and every failure of one row kept to that row."""

import io
import json

import numpy as np
import pytest

from raydistill.data.corpus import RequestBuilder, _split_lines
from raydistill.spec import DataSpec, TeacherPassSpec


def _records(data: bytes, cap: int) -> list[dict]:
    return [r for t in _split_lines(io.BytesIO(data), "c.jsonl", cap) for r in t.to_pylist()]


def test_lines_keep_their_numbers_and_skip_blanks():
    rows = _records(b'{"a": 1}\n\n{"b": 2}\n{"c": 3}', cap=100)
    assert [(r["source"], r["raw"], r["oversize"]) for r in rows] == [("c.jsonl:1", b'{"a": 1}', 0), ("c.jsonl:3", b'{"b": 2}', 0), ("c.jsonl:4", b'{"c": 3}', 0)]


def test_a_50mb_line_is_marked_oversize_and_its_neighbours_are_kept():
    big = b'{"prompt": "' + b"x" * (50 << 20) + b'"}'
    rows = _records(b'{"prompt": "before"}\n' + big + b'\n{"prompt": "after"}\n', cap=16 << 20)
    assert [r["source"] for r in rows] == ["c.jsonl:1", "c.jsonl:2", "c.jsonl:3"]
    assert rows[1]["oversize"] == len(big) and len(rows[1]["raw"]) <= 200 and rows[1]["raw"].startswith(b'{"prompt": "xxx')
    assert json.loads(rows[0]["raw"]) == {"prompt": "before"} and json.loads(rows[2]["raw"]) == {"prompt": "after"}


def test_a_line_exactly_at_the_cap_is_kept():
    line = b"y" * 64
    assert _records(line + b"\n" + line + b"z\n", cap=64)[0]["oversize"] == 0
    assert _records(line + b"\n" + line + b"z\n", cap=64)[1]["oversize"] == 65


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from raydistill.models import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    tok = build_tiny_tokenizer()
    # A template that raises for some conversations, as real ones do (e.g. "roles must alternate").
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    tok.save_pretrained(d)
    return str(d)


def test_any_failure_of_one_row_is_that_rows_reject(tokenizer_dir):
    data = DataSpec(path=__file__, max_record_bytes=1000)
    builder = RequestBuilder(data, TeacherPassSpec(), tokenizer_dir, max_prompt_tokens=400)
    rows = {
        "good1": (b'{"id": "good1", "prompt": "the quiet forest"}', 0),
        "nested": (b'{"id": "deep", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 0),
        "template": (json.dumps({"id": "t", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]}).encode(), 0),
        "oversize": (b'{"prompt": "xxxx', 5000),
        "good2": (json.dumps({"id": "good2", "messages": [{"role": "user", "content": "hi"}]}).encode(), 0),
    }
    batch = {"raw": np.array([r for r, _ in rows.values()], dtype=object), "source": np.array([f"c.jsonl:{i}" for i in range(len(rows))]),
             "oversize": np.array([o for _, o in rows.values()])}
    out = builder(batch)
    reasons = dict(zip(rows, out["reject"]))
    assert reasons["good1"] == reasons["good2"] == ""
    assert reasons["nested"].startswith("RecursionError")
    assert "no system role" in reasons["template"]
    assert reasons["oversize"] == "record is 5000 bytes, over the limit of 1000 (data.max_record_bytes)"
    assert [i for i, r in zip(out["id"], out["reject"]) if not r] == ["good1", "good2"]
    assert all(out["prompt_ids"][i] for i in (0, 4))
