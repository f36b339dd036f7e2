"""The manifest's versions come from the installed distributions' metadata; they must be what the modules say they are."""

from __future__ import annotations

import importlib
import sys

from raydistill.jobs.pipeline import _versions


def test_versions_are_the_modules_own():
    got = _versions()
    for name in ("ray", "torch", "transformers", "deepspeed", "vllm"):
        assert got[name] == importlib.import_module(name).__version__, name
    assert got["python"] == ".".join(map(str, sys.version_info[:3]))
