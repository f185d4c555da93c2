"""Where studies live: an embedded journal file by default, or any Optuna storage URL.

* default: Optuna's ``JournalStorage`` on a ``JournalFileBackend`` file under the user cache dir
  (``<cache>/qflash-gen/tune/studies.journal``).  No server; every finished trial is appended and
  fsynced before the next one starts, so a killed run loses at most the trial in flight, and
  several processes on one host can share it (the file is locked per append).
* ``--storage PATH`` (no ``://``): a journal file at PATH (one host: the lock is a local file).
* ``--storage URL``: Optuna's RDB storage, for processes on many hosts.  ``postgresql://…``
  (driver: the optional extra ``qflash-gen[distributed]``, psycopg2-binary; psycopg 3 works too),
  ``mysql+pymysql://…`` or ``mysql://…`` (MySQL / MariaDB; bring the driver), ``sqlite:///…``
  (one host).  A plain ``postgresql://`` or ``mysql://`` URL uses whichever of SQLAlchemy's
  drivers is installed; ``postgres://`` is read as ``postgresql://``.

Several processes share a study safely through any of these: see :mod:`.lease` for how they split
the work and :mod:`.study` for the budget per slot.

A killed run leaves its trial in flight RUNNING (Optuna's heartbeat only works inside
``Study.optimize``; the tuner uses ask/tell).  Each trial records its owner ``host:pid``, and
:func:`fail_abandoned` marks RUNNING trials of dead processes on this host FAIL when a study
starts; a worker that dies on another host is found by its stale lease heartbeat
(:mod:`.lease`), and its trial in flight is failed then.

Studies read well in optuna-dashboard (``optuna-dashboard <journal file or URL>``): the
objective carries its name (:func:`label_study`: ``latency_us``, ``energy_uj``, ``sqnr_db``), the
SQNR floor is stored as Optuna's ``constraints`` trial attribute, the list the dashboard reads
(:func:`record_constraint`), and a single-objective trial below the floor is finished PRUNED with
its value kept (:func:`tell_measured`), because the dashboard's "Best Trial" is the storage's best
COMPLETE trial, which knows no constraints.  Samplers see no difference: TPE sorts trials by
their constraints before their state.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import socket
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState

from qflash_gen.tune import journal

ENV_STORAGE = "QFLASH_GEN_TUNE_STORAGE"
JOURNAL_LOCK_GRACE_S = 10


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
        shown = _redact(url)
        full = _with_driver(url)
        try:
            storage = _open_rdb(full)
        except Exception as exc:  # noqa: BLE001 - driver missing, bad URL, server down: all are usage errors
            why = _redact_urls(str(exc).replace(full, _redact(full)).replace(url, shown))
            raise ValueError(
                f"--storage {shown}: cannot open it: {type(exc).__name__}: {why}{_hint(url, exc)}"
            ) from None
        return storage, shown
    else:
        path = Path(spec).expanduser()
    if path.exists() and path.is_dir():
        raise ValueError(f"--storage {path}: is a directory; give a journal file path or a storage URL")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The append lock is held for one write + fsync (milliseconds); a worker killed while holding
    # it would stall the others for Optuna's default 30 s grace before they break it.
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path), grace_period=JOURNAL_LOCK_GRACE_S)
    backend = optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock)
    journal.repair_torn_tail(path, lock)  # a writer killed mid-append (issue 18, item 9)
    try:
        return optuna.storages.JournalStorage(backend), f"journal:{path}"
    except ValueError as exc:  # json.JSONDecodeError too: a broken line inside the file
        raise ValueError(journal.damage(path, exc)) from None


# scheme -> (drivers SQLAlchemy may use for it, in its order of preference: (module, dialect+driver))
_DRIVERS = {
    "postgresql": (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")),
    "postgres": (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")),
    "mysql": (("MySQLdb", "mysql+mysqldb"), ("pymysql", "mysql+pymysql")),
}


def _with_driver(url: str) -> str:
    """A plain ``postgresql://`` / ``mysql://`` URL with the driver that is installed named in it.

    SQLAlchemy 2.1 picks psycopg (3) for ``postgresql://`` and mysqlclient for ``mysql://``;
    with only psycopg2 (our ``[distributed]`` extra) or PyMySQL installed it would fail."""
    scheme, sep, rest = url.partition("://")
    drivers = _DRIVERS.get(scheme.lower())
    if drivers is None:
        return url
    for module, dialect in drivers:
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}{sep}{rest}"
    # none installed: let SQLAlchemy say so (the hint names the extra)
    return f"postgresql{sep}{rest}" if scheme.lower() == "postgres" else url


def _hint(url: str, exc: BaseException) -> str:
    scheme = url.partition("://")[0].lower()
    if not isinstance(exc, ImportError) and "No module named" not in str(exc):
        return ""
    if scheme.startswith("postgres"):
        return "; install a PostgreSQL driver: pip install 'qflash-gen[distributed]' (psycopg2-binary)"
    if scheme.startswith("mysql"):
        return "; install a MySQL driver: pip install PyMySQL (then mysql+pymysql://... or mysql://...)"
    return ""


def _open_rdb(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage; retried when several processes create the tables of a new database at
    the same moment (PostgreSQL then fails all but one with a unique-violation on its catalog)."""
    import sqlalchemy.exc

    kwargs = {}
    if url.startswith("postgresql"):
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}  # a connection idle through a long compile may be gone
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.2 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)(?P<password>[^\s/]*)@")


def _redact_urls(text: str) -> str:
    """``text`` with the password field of every URL in it replaced by ``***`` (and nothing else:
    a password that is also a word of the message leaves the word alone)."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}***@", text)


def _redact(url: str) -> str:
    """A URL without its password (for logs and DB provenance)."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


def as_backend(storage: optuna.storages.BaseStorage | str) -> optuna.storages.BaseStorage:
    """The storage itself: a URL or journal path is opened as ``--storage`` opens it (the installed
    driver named, concurrent table creation retried); Optuna's cache layer is not needed here."""
    if isinstance(storage, str):
        return open_storage(storage)[0]
    return storage


def owner_tag() -> str:
    """``host:pid`` of this process, stored on each trial so a later run can tell whose it was."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` of this host still there (a process of another user counts as alive)?"""
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
        if h != host or not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            n += 1
        except (RuntimeError, ValueError):  # finished meanwhile by someone else
            pass
    return n


# -- what optuna-dashboard reads ---------------------------------------------------------------------
METRIC_NAMES = {"latency": "latency_us", "energy": "energy_uj", "sqnr": "sqnr_db"}
CONSTRAINTS_ATTR = "constraints"  # Optuna's trial system attr: a list, <= 0 feasible (the dashboard reads it)


def label_study(study: optuna.Study, axes: Sequence[str], sqnr_floor: float) -> None:
    """Name the study's objective(s) (``axes``: ``latency``, ``energy``, ``sqnr``) and record the
    SQNR floor as a study user attribute, where optuna-dashboard shows them."""
    names = [METRIC_NAMES[a] for a in axes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if study.metric_names != names:
            study.set_metric_names(names)
    if study.user_attrs.get("sqnr_floor_db") != sqnr_floor:
        study.set_user_attr("sqnr_floor_db", float(sqnr_floor))


def record_constraint(trial: optuna.trial.Trial, value: float) -> None:
    """Store ``value`` (<= 0: feasible) as the trial's ``constraints`` list, Optuna's own format
    for a sampler's constraints_func and the one optuna-dashboard reads."""
    trial.storage.set_trial_system_attr(trial._trial_id, CONSTRAINTS_ATTR, [float(value)])


def tell_measured(study: optuna.Study, trial: optuna.trial.Trial, values: float | list[float], feasible: bool) -> None:
    """Finish a measured trial.  Below the floor, a single-objective trial is reported (its value
    kept as step 0) and told PRUNED, so no reader that ignores constraints (the dashboard's Best
    Trial, ``storage.get_best_trial``) takes it for the best; multi-objective trials are told
    COMPLETE either way (their SQNR is an axis)."""
    if feasible or len(study.directions) > 1:
        study.tell(trial, values)
        return
    trial.report(float(values[0] if isinstance(values, list) else values), step=0)
    study.tell(trial, state=TrialState.PRUNED)
