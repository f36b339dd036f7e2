"""``write_atomic``: the one way the pipeline writes a file, whole or not at all.

A crash or a kill mid-write (the teacher pass and training are killed and resumed by design)
must never leave half a manifest, spec or report for the next run to trip over: the bytes go
to a temporary file beside the target, which then replaces it in one rename.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    path = Path(path)
    # The pid keeps two writers of the same file (retried Ray tasks) off each other's temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)
