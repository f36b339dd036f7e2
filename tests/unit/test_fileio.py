"""``write_atomic``: a reader sees the old file or the new one, never a part."""

import os

from raydistill.fileio import write_atomic


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    write_atomic(target, "old")
    write_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_atomic(target, "complete")

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    try:
        write_atomic(target, "half")
    except OSError:
        pass
    assert target.read_text() == "complete"
