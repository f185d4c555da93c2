"""A damaged Optuna journal file: repair what can be repaired, name the file where it cannot.

A journal is one JSON record per line, appended under a lock and fsynced.  A process killed in
the middle of an append leaves a last line without its line end.  Optuna skips such a line on
read, but its next append continues it, which turns it into a broken line *inside* the file: from
then on every read fails with a bare ``JSONDecodeError`` ("Expecting ',' delimiter") that names
no file (issue 18, item 9).

What we do, when a study storage is opened (:func:`repair_torn_tail`, then :func:`damage`):

* **a torn last line is dropped**, under the journal's own lock, with a message naming the file
  and the bytes dropped.  It is safe: a record is written (and a trial finished) only once its
  whole line is, and a live writer holds the lock until its line is complete, so what has no
  line end under the lock is what a dead writer left.  Refusing instead would stop every later
  run on the study for a record that was never finished (a killed run must resume);
* **any other broken line** (a line a pre-fix run appended onto, a file edited by hand) is an
  error naming the file and the line: nothing after it can be trusted, and nothing is changed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

CHUNK = 1 << 16


def _last_newline(fh: Any, size: int) -> int:
    """Offset of the last ``\\n`` in the open file (-1: none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - CHUNK)
        fh.seek(start)
        block = fh.read(pos - start)
        i = block.rfind(b"\n")
        if i >= 0:
            return start + i
        pos = start
    return -1


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def repair_torn_tail(path: str | os.PathLike[str], lock: Any, *, say: Any = None) -> int:
    """Drop the unfinished last line of the journal at ``path`` (see the module doc), holding
    ``lock`` (the journal's Optuna file lock); returns the bytes dropped (0: nothing torn)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0 or _ends_with_newline(path):
        return 0
    lock.acquire()
    try:
        with open(path, "r+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            fh.seek(size - 1)
            if fh.read(1) == b"\n":
                return 0  # a writer finished its line while we waited for the lock
            cut = _last_newline(fh, size) + 1
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        lock.release()
    dropped = size - cut
    message = (
        f"qflash-tune: journal {path}: dropped its unfinished last line ({dropped} bytes after byte {cut}, no "
        "line end: a process killed while appending); every finished trial is in the lines before it"
    )
    print(message, file=say or sys.stderr)
    return dropped


def damage(path: str | os.PathLike[str], error: BaseException) -> str:
    """The message for a journal Optuna cannot read: the file, the first broken line, what to do."""
    path = Path(path)
    where, why = "", str(error)
    try:
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.endswith(b"\n"):
                    where, why = f":{lineno}", "the line has no line end"
                    break
                try:
                    json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    where, why = f":{lineno}", f"not a journal record ({exc})"
                    break
    except OSError as exc:
        why = f"cannot read it: {exc.strerror or exc}"
    return (
        f"--storage {path}{where}: the study journal is damaged: {why}. The lines before it hold the "
        "trials finished until then; keep them by copying those lines to a new file and passing that as "
        "--storage, or start a new --storage (nothing was changed)"
    )
