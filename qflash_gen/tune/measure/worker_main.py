"""Worker process main: ``python .../qflash_gen/tune/measure/worker_main.py TARGET`` (see :mod:`.isolation`).

Reads one JSON job per line on stdin, calls ``TARGET(job)``, answers one JSON line.  The
protocol goes to a private duplicate of the original stdout; fd 1 itself is pointed at stderr so
that anything a compiler or library prints cannot corrupt the replies.

It is started as a script, not with ``-m``, and imports only the standard library: importing the
``qflash_gen`` package loads torch and Triton (seconds), which only the target should pay for
(a fake target in a test starts in a fraction of a second).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run as a script: its directory (qflash_gen/tune/measure) must not shadow top-level module names.
    sys.path.pop(0)


def _reply(out, message: dict) -> None:
    out.write(json.dumps(message, default=str) + "\n")
    out.flush()


def resolve_target(target: str):
    """Import ``module:function`` or ``/path/file.py:function``."""
    where, _, name = target.rpartition(":")
    if where.endswith(".py") or os.sep in where:
        path = Path(where)
        spec = importlib.util.spec_from_file_location(f"_qflash_worker_target_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import worker target file {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ImportError(f"worker target {target!r}: {name!r} is not a function of {where!r}")
    return fn


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python worker_main.py module:function|/path/file.py:function", file=sys.stderr)
        return 2
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints (compilers, libraries) go to stderr, not into the protocol
    sys.stdout = sys.stderr
    out = os.fdopen(proto_fd, "w", buffering=1, encoding="utf-8")

    target = resolve_target(argv[0])
    _reply(out, {"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        job_id = msg.get("id")
        try:
            result = target(msg["job"])
        except Exception as exc:  # a bad candidate: report it, keep serving unless it is fatal
            # A target marks an exception fatal (``exc.fatal = True``) when this process cannot
            # run further jobs, e.g. after an illegal memory access poisoned the CUDA context.
            fatal = bool(getattr(exc, "fatal", False))
            tb = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            _reply(out, {"id": job_id, "ok": False, "error": tb[-2000:], "fatal": fatal})
            if fatal:
                return 3
            continue
        _reply(out, {"id": job_id, "ok": True, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
