"""The engine-args check's field table: cached as JSON per installed vLLM, so validating a spec does not import vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raydistill import engine_args as ea


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_CACHE", str(tmp_path))
    ea._engine_fields.cache_clear()
    yield tmp_path
    ea._engine_fields.cache_clear()


def test_every_stored_type_reads_back_as_vllms_own():
    live = ea._live_fields()
    stored = 0
    for name, tp in live.items():
        try:
            j = ea._type_to_json(tp)
        except ea._Unencodable:
            continue
        assert ea._type_from_json(json.loads(json.dumps(j))) == tp, name
        stored += 1
    assert stored > 0.8 * len(live)  # only fields typed with vLLM's own classes are opaque


def test_the_table_is_written_once_and_read_back(fresh_cache):
    first = ea._engine_fields()
    (path,) = fresh_cache.glob("vllm-engine-args-*.json")
    table = json.loads(path.read_text())
    assert table["max_model_len"] == {"cls": "int"} and table["compilation_config"] is None
    ea._engine_fields.cache_clear()
    again = ea._engine_fields()
    assert again.keys() == first.keys() and again["dtype"] == ea._live_fields()["dtype"]
    assert again["compilation_config"] is ea._OPAQUE


def test_a_damaged_table_is_rebuilt(fresh_cache):
    ea._engine_fields()
    (path,) = fresh_cache.glob("vllm-engine-args-*.json")
    path.write_text('{"max_model_len": {"cls"')
    ea._engine_fields.cache_clear()
    assert ea.engine_args_problems({"max_model_len": "abc"})
    assert json.loads(path.read_text())["max_model_len"] == {"cls": "int"}


def test_an_opaque_field_is_still_checked_with_vllms_type(fresh_cache):
    ea._engine_fields()
    ea._engine_fields.cache_clear()
    problems = ea.engine_args_problems({"compilation_config": {"no_such_option": 1}})
    assert len(problems) == 1 and problems[0].startswith("compilation_config: ")


def test_validating_a_spec_with_a_cached_table_does_not_import_vllm(fresh_cache):
    ea._engine_fields()  # the table, written by this process
    code = (
        "import sys\n"
        "from raydistill.engine_args import engine_args_problems\n"
        "p = engine_args_problems({'max_model_len': 'abc', 'max_model_lenght': 1, 'dtype': 'float32', 'enforce_eager': True})\n"
        "print(len(p), 'vllm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "RAYDISTILL_CACHE": str(fresh_cache)}).stdout.split()
    assert out == ["2", "False"]
