"""File writes every command shares."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def update_sha256(h, path: Path) -> None:
    """Feed a file's bytes to a hash, 4 MiB at a time."""
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    update_sha256(h, path)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a reader (or a killed run) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
