"""The engine dtype choice: explicit values honoured, auto resolved per node from a cached bf16 self-test.

The self-test's verdict logic runs real child processes here: one that dies with SIGILL (the
failure seen on Intel AMX machines), one that passes, one that hangs, so both branches of
``dtype: auto`` are exercised on any CPU.
"""

import json
import sys

import pytest

from raydistill import engine_dtype
from raydistill.engine_dtype import bf16_verdict, death_hint, resolve, run_selftest

OK = [sys.executable, "-c", f"print({engine_dtype._OK_MARKER!r})"]
SIGILL = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]


def _never(*_):
    raise AssertionError("must not be called")


def test_explicit_dtype_is_honoured_without_a_self_test():
    args, choice = resolve({"dtype": "bfloat16", "max_model_len": 512}, "serve.engine_args.dtype", is_cpu=_never, verdict=_never)
    assert args == {"dtype": "bfloat16", "max_model_len": 512}
    assert (choice.dtype, choice.source, choice.key) == ("bfloat16", "explicit", "serve.engine_args.dtype")


@pytest.mark.parametrize("given", [{}, {"dtype": "auto"}, {"dtype": "AUTO"}, {"dtype": None}])
def test_auto_on_cpu_follows_the_verdict(given):
    args, choice = resolve({**given, "enforce_eager": True}, "teacher.engine_args.dtype", is_cpu=lambda: True, verdict=lambda: {"bf16": True, "detail": "ok"})
    assert args == {"dtype": "bfloat16", "enforce_eager": True} and choice.source == "auto"
    args, choice = resolve(given, "teacher.engine_args.dtype", is_cpu=lambda: True,
                           verdict=lambda: {"bf16": False, "detail": "the engine died with SIGILL (exit code -4)"})
    assert args["dtype"] == "float32" and "SIGILL" in choice.reason and choice.source == "auto"


def test_auto_on_a_gpu_is_left_to_vllm():
    args, choice = resolve({}, "teacher.engine_args.dtype", is_cpu=lambda: False, verdict=_never)
    assert args["dtype"] == "auto" and choice.dtype == "auto" and "GPU" in choice.reason


def test_selftest_that_dies_with_sigill_refuses_bf16():
    v = run_selftest(SIGILL, timeout_s=60)
    assert v["bf16"] is False and "SIGILL" in v["detail"] and "-4" in v["detail"]


def test_selftest_passes_only_with_exit_0_and_the_marker():
    assert run_selftest(OK, timeout_s=60)["bf16"] is True
    quiet = run_selftest([sys.executable, "-c", "pass"], timeout_s=60)
    assert quiet["bf16"] is False and "exit code 0" in quiet["detail"]
    failed = run_selftest([sys.executable, "-c", "import sys; sys.stderr.write('EngineCore died with exit code -4\\n'); sys.exit(1)"], timeout_s=60)
    assert failed["bf16"] is False and "SIGILL" in failed["detail"]


def test_selftest_that_hangs_refuses_bf16_and_is_killed():
    v = run_selftest([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1)
    assert v["bf16"] is False and "within 1s" in v["detail"]


def test_verdict_is_cached_and_reused(tmp_path):
    path = tmp_path / "verdict.json"
    first = bf16_verdict(command=SIGILL, timeout_s=60, path=path)
    assert first["bf16"] is False and json.loads(path.read_text())["bf16"] is False
    # A second engine on the same machine reads the verdict; it does not run the test again.
    assert bf16_verdict(command=OK, timeout_s=60, path=path)["bf16"] is False
    path.unlink()
    assert bf16_verdict(command=OK, timeout_s=60, path=path)["bf16"] is True


def test_corrupt_cache_is_tested_again(tmp_path):
    path = tmp_path / "verdict.json"
    path.write_text("{not json")
    assert bf16_verdict(command=OK, timeout_s=60, path=path)["bf16"] is True


def test_machine_key_names_vllm_version():
    import vllm

    key = engine_dtype.machine_key()
    assert f"vllm{vllm.__version__}" in key and key == engine_dtype.machine_key()


def test_death_hint_names_the_key_for_half_precision_only():
    hint = death_hint({"dtype": "bfloat16"}, "serve.engine_args.dtype")
    assert "SIGILL" in hint and "serve.engine_args.dtype" in hint and "float32" in hint
    assert "SIGILL" not in death_hint({"dtype": "float32"}, "teacher.engine_args.dtype")
