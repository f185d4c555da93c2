"""Where studies live: an embedded journal file by default, or any Optuna storage URL.

* default: Optuna's ``JournalStorage`` on a ``JournalFileBackend`` file under the user cache dir
  (``<cache>/qflash-gen/tune/studies.journal``).  No server; every finished trial is appended and
  fsynced before the next one starts, so a killed run loses at most the trial in flight, and
  several processes on one host can share it (the file is locked per append).
* ``--storage PATH`` (no ``://``): a journal file at PATH.
* ``--storage URL`` (``sqlite:///…``, ``postgresql://…``, ``mysql://…``): Optuna's RDB storage.

A killed run leaves its trial in flight RUNNING (Optuna's heartbeat only works inside
``Study.optimize``; the tuner uses ask/tell).  Each trial records its owner ``host:pid``, and
:func:`fail_abandoned` marks RUNNING trials of dead processes on this host FAIL when a study
starts.  (Workers on other hosts that die leave RUNNING trials; they are never counted as
measured, so nothing is wrong, only untidy.)
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import optuna

ENV_STORAGE = "QFLASH_GEN_TUNE_STORAGE"


def default_storage_path() -> Path:
    """``$QFLASH_GEN_TUNE_STORAGE`` if set, else ``<user cache dir>/qflash-gen/tune/studies.journal``."""
    env = os.environ.get(ENV_STORAGE)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        cache = Path(platformdirs.user_cache_dir("qflash-gen"))
    except ImportError:  # a bare GPU box with only torch/triton: the XDG default
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qflash-gen"
    return cache / "tune" / "studies.journal"


def open_storage(spec: str | os.PathLike[str] | None = None) -> tuple[optuna.storages.BaseStorage, str]:
    """``(storage, description)`` for ``--storage`` (see the module doc); ValueError naming it."""
    if spec is None:
        path = default_storage_path()
    elif "://" in str(spec):
        url = str(spec)
        try:
            storage = optuna.storages.RDBStorage(url)
        except Exception as exc:  # noqa: BLE001 - driver missing, bad URL, server down: all are usage errors
            shown = _redact(url)
            why = str(exc).replace(url, shown)
            raise ValueError(f"--storage {shown}: cannot open it: {type(exc).__name__}: {why}") from None
        return storage, _redact(url)
    else:
        path = Path(spec).expanduser()
    if path.exists() and path.is_dir():
        raise ValueError(f"--storage {path}: is a directory; give a journal file path or a storage URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    return optuna.storages.JournalStorage(backend), f"journal:{path}"


def _redact(url: str) -> str:
    """A URL without its password (for logs and DB provenance)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def owner_tag() -> str:
    """``host:pid`` of this process, stored on each trial so a later run can tell whose it was."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_abandoned(study: optuna.Study) -> int:
    """Mark RUNNING trials whose owner process (on this host) is gone as FAIL; returns the count.

    A kill -9 leaves the trial in flight RUNNING in a journal file (it has no heartbeat); it was
    never finished, so nothing finished is lost, but it would sit in the study forever."""
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = str(t.user_attrs.get("owner", ""))
        h, _, pid = owner.rpartition(":")
        if h != host or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            n += 1
        except (RuntimeError, ValueError):  # finished meanwhile by someone else
            pass
    return n
