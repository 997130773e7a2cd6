"""What a command shows: its own lines on the terminal, the engines' logs in a file.

vLLM, DeepSpeed, torch.distributed and Ray write INFO logs from Python loggers bound to
`sys.stdout`/`sys.stderr` at their import, from C++ straight to file descriptors 1 and 2, and
from child processes (vLLM's engine core, Ray's workers) that inherit those descriptors. Only
moving the descriptors themselves catches all of it: inside `quiet(log)`, descriptors 1 and 2
point at a temporary file, appended to `log` at the end, and the command's own lines (`say`,
progress bars on `err()`) go to copies of the terminal's descriptors taken on the way in.
Outside it, or when stdout is not a real file (typer's test runner), everything goes where it
always went.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

_terminal: tuple[TextIO, TextIO] | None = None  # (out, err) while quiet() is active
_log: Path | None = None  # where the log goes at the end
_tmp: Path | None = None  # where it is written meanwhile
_header = 0  # bytes of the header line: a log with no more holds nothing
last_log: Path | None = None  # where the last quiet() block's log ended up


def out() -> TextIO:
    return _terminal[0] if _terminal else sys.stdout


def err() -> TextIO:
    """Where progress bars and warnings go: the terminal's stderr."""
    return _terminal[1] if _terminal else sys.stderr


def say(*parts: object, error: bool = False) -> None:
    """One line of the command's own, always on the terminal."""
    print(*parts, file=err() if error else out(), flush=True)


def log_file() -> Path | None:
    """Where the engines' logs can be read, while quiet() is active: the output folder's log
    file, or the temporary one while that folder does not exist (a run stopped early)."""
    if _log is None:
        return None
    return _log if _log.parent.is_dir() else _tmp


def log_has_content() -> bool:
    return _tmp is not None and _tmp.stat().st_size > _header


def where_logs_are() -> str:
    """For a message that points at the engines' own words."""
    return f"its log: {log_file()}" if _log else "its log is above"


# "ValueError: ...", "torch.OutOfMemoryError: ...": how Python ends a traceback
_ERROR_LINE = re.compile(r"^(?:[\w.]*\.)?\w*(?:Error|Exception)\b.*?: .+")


def last_error_line(tail_bytes: int = 65536) -> str | None:
    """The last `SomeError: message` line this command wrote to the log, e.g. the cause an
    engine's child process printed before its parent said only "see root cause above"."""
    if _tmp is None:
        return None
    with open(_tmp, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
        lines = f.read().decode("utf-8", "replace").splitlines()
    found = [ln.strip() for ln in lines if _ERROR_LINE.match(ln.strip())]
    return found[-1][:300] if found else None


def _real_fds() -> bool:
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def _settle(tmp: Path, log: Path) -> Path | None:
    """The block's log appended to `log` when its folder exists (the command made or found it);
    otherwise kept in the temporary file if it holds anything, or removed."""
    data = tmp.read_bytes()
    if log.parent.is_dir():
        try:
            with open(log, "ab") as f:
                f.write(data)
        except OSError:
            return tmp
        tmp.unlink()
        return log
    if len(data) > _header:
        return tmp
    tmp.unlink()
    return None


@contextmanager
def quiet(log: Path | None, title: str = "") -> Iterator[None]:
    """Send everything written to descriptors 1 and 2 (Python, C++ and child processes) to a log
    while the block runs; `say` and `err()` still reach the terminal. The log is written to a
    temporary file and appended to `log` at the end (a run that stops before its output folder
    exists leaves no folder behind); `last_log` then says where it is. Nothing is redirected
    when `log` is None (--verbose) or stdout is not a real descriptor."""
    global _terminal, _log, _tmp, _header, last_log
    last_log = None
    if log is None or _terminal is not None or not _real_fds():
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd, name = tempfile.mkstemp(prefix="empathy-distill-", suffix=".log")
    header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n".encode()
    os.write(fd, header)
    saved = os.dup(1), os.dup(2)
    terminal = (
        os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace"),
        os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace"),
    )
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _terminal, _log, _tmp, _header = terminal, log, Path(name), len(header)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in saved:
            os.close(f)
        for t in terminal:
            t.close()
        last_log = _settle(_tmp, log)
        _terminal, _log, _tmp = None, None, None
