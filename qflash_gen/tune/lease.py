"""Leases: which process measures a config, which slot it holds, who writes the DB.

Several ``qflash-tune`` processes, on one host or many, share a study through its Optuna storage.
Two of them must never measure the same config, each must know which budget it spends, and one
of them must write the study's winner.  Optuna has no lock, but every storage has one atomic
*create if absent*: a study name is unique (a unique index on ``studies.study_name`` in
PostgreSQL, MySQL and SQLite; in a journal file the first CREATE_STUDY record of a name wins and
a later one raises ``DuplicatedStudyError`` for its writer).  So a lease is an empty study named::

    qflash-lease:<study id>:<kind>:<key>

created by the process that takes it and deleted when it is released.  The kinds:

* ``config:<config hash>`` -- held while that config is measured.  The holder tells its trial
  *before* it releases the lease, and a process that wins the lease re-reads the finished trials
  *after* winning it, so a config measured meanwhile is seen and not measured again.
* ``worker:<k>`` -- slot k, held from when a process opens the study until it is done
  with it (``qflash-tune`` opens all its studies when it starts).  ``--trials`` is the budget of
  one slot: the configs measured by trials tagged ``worker = k``.  A process takes a slot whose
  holder died (it resumes that worker's budget), else the lowest free slot.  So a dead worker's
  slot lease is only reaped by the process that takes it over: until then it marks a budget
  left unfinished.
* ``export:db`` -- held while one process writes the study's winner into the YAML DB.

The holder (host, pid, a per-process token, the trial number it measures, a heartbeat time) is
stored on the lease as the study user attr ``holder`` and refreshed every :data:`HEARTBEAT_S` by
a thread.
A holder is dead when, on this host, its pid is gone (or is this process's pid with another
token: a pid reused after a kill), or, on any host, its heartbeat is older than :data:`STALE_S`
(a killed host or a frozen process; hosts' clocks must agree to well within that, e.g. NTP).  A
dead holder's lease is *reaped*: its trial, if still RUNNING, is marked FAIL, and the lease is
deleted by its study id (ids are never reused by PostgreSQL or the journal), so a reaper never
deletes a newer lease of the same name.

Leases left by a killed run are cleaned up: a process opening a study reaps that study's dead
leases and takes over a dead slot (:meth:`Leases.claim_slot`), and once per storage it sweeps the
dead config and export leases of every other study, and the leases of deleted studies
(:func:`sweep_once`).  A dead slot lease of another study is left for the run that resumes it;
``qflash-db leases --storage S --clean`` removes those too (:func:`clean`).  Lease studies show
up in study listings (optuna-dashboard's too) while they exist: the live ones are a run's claims.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from optuna.exceptions import DuplicatedStudyError
from optuna.study import StudyDirection
from optuna.trial import TrialState

from qflash_gen.tune.storage import as_backend, pid_alive

PREFIX = "qflash-lease"
HEARTBEAT_S = 30.0  # how often a holder refreshes its leases
STALE_S = 300.0  # a holder silent this long is dead (10 heartbeats)
ORPHAN_GRACE_S = 2.0  # a lease without a holder yet: its creator gets this long to write one
# Lease kinds.  A slot's lease keeps the stored name "worker:<k>" (studies written before the
# word "slot" was used must still resume).
CONFIG, SLOT, EXPORT = "config", "worker", "export"

PROCESS_TOKEN = uuid.uuid4().hex[:12]  # this process; a reused pid gets another one
_HOST = socket.gethostname()


_swept: set[str] = set()  # storages swept by this process (sweep_once)


def lease_name(study_id: int, kind: str, key: str) -> str:
    return f"{PREFIX}:{study_id}:{kind}:{key}"


def is_lease_name(name: str) -> bool:
    """True for the names of leases (to leave them out of study listings)."""
    return name.startswith(PREFIX + ":")


def holder_alive(holder: Mapping[str, Any] | None, now: float | None = None) -> bool:
    """Is the process that wrote ``holder`` still there? (see the module doc)."""
    if not holder:
        return False
    now = time.time() if now is None else now
    try:
        heartbeat = float(holder.get("heartbeat", 0.0))
        pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if now - heartbeat > STALE_S:
        return False
    if holder.get("host") == _HOST:
        if pid == os.getpid():
            return holder.get("token") == PROCESS_TOKEN
        return pid > 0 and pid_alive(pid)
    return True


@dataclasses.dataclass(frozen=True)
class LeaseInfo:
    """A lease as found in the storage."""

    kind: str
    key: str
    lease_id: int
    holder: dict[str, Any] | None


class Leases:
    """The leases of one study, as seen and held by this process.

    Args:
        storage: the study's storage (a ``BaseStorage``; a URL opens an RDBStorage).
        study_id: the study the leases belong to.
        info: extra fields written into every holder record (slot, device label).
        heartbeat_s: refresh period of the held leases (default :data:`HEARTBEAT_S`).

    Use as a context manager, or call :meth:`close`: it stops the heartbeat and releases every
    lease still held."""

    def __init__(
        self,
        storage: Any,
        study_id: int,
        *,
        info: Mapping[str, Any] | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        self.storage = as_backend(storage)
        self.study_id = int(study_id)
        self.info = dict(info or {})
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else float(heartbeat_s)
        self._held: dict[str, tuple[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- holder records --------------------------------------------------------------------------
    def _holder(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "host": _HOST,
            "pid": os.getpid(),
            "token": PROCESS_TOKEN,
            "heartbeat": time.time(),
            **self.info,
            **extra,
        }

    def _read(self, name: str) -> LeaseInfo | None:
        try:
            lease_id = self.storage.get_study_id_from_name(name)
            holder = self.storage.get_study_user_attrs(lease_id).get("holder")
        except KeyError:
            return None  # released meanwhile
        kind, key = name.split(":", 3)[2:]
        return LeaseInfo(kind, key, lease_id, dict(holder) if holder else None)

    def _alive(self, info: LeaseInfo, *, wait: bool = True) -> bool:
        """Is the holder alive?  A lease without a holder record yet was just created (its holder
        comes a moment later) or its creator died in between: with ``wait`` it gets
        :data:`ORPHAN_GRACE_S` to show up, without it counts as alive."""
        if info.holder is None:
            if not wait:
                return True
            time.sleep(ORPHAN_GRACE_S)
            try:
                holder = self.storage.get_study_user_attrs(info.lease_id).get("holder")
            except KeyError:
                return False  # released meanwhile
            return holder is not None and holder_alive(holder)
        return holder_alive(info.holder)

    def reap(self, info: LeaseInfo) -> None:
        """Fail the dead holder's RUNNING trial (if any) and delete its lease (by id)."""
        holder = info.holder or {}
        number = holder.get("trial")
        if number is not None:
            try:
                trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, int(number))
                trial = self.storage.get_trial(trial_id)
                if trial.state == TrialState.RUNNING:
                    who = f"{holder.get('host')}:{holder.get('pid')}"
                    self.storage.set_trial_user_attr(
                        trial_id, "error", f"abandoned: its worker {who} stopped without finishing it"
                    )
                    self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except (KeyError, RuntimeError, ValueError):  # gone, or finished meanwhile
                pass
        try:
            self.storage.delete_study(info.lease_id)
        except KeyError:
            pass

    # -- taking and releasing --------------------------------------------------------------------
    def acquire(self, kind: str, key: str, **extra: Any) -> bool:
        """Take the lease ``kind:key``; False if a live process holds it.  A dead holder's lease
        is reaped and taken.  ``extra`` goes into the holder record (e.g. ``trial``: the trial number)."""
        name = lease_name(self.study_id, kind, key)
        for _ in range(4):
            try:
                lease_id = self.storage.create_new_study([StudyDirection.MINIMIZE], study_name=name)
            except DuplicatedStudyError:
                info = self._read(name)
                if info is None:
                    continue  # released between our create and our read: try again
                if self._alive(info):
                    return False
                self.reap(info)
                continue
            holder = self._holder(extra)
            self.storage.set_study_user_attr(lease_id, "holder", holder)
            with self._lock:
                self._held[name] = (lease_id, holder)
            self._start_heartbeat()
            return True
        return False

    def release(self, kind: str, key: str) -> None:
        """Give the lease back (deletes it); a lease not held is ignored."""
        with self._lock:
            got = self._held.pop(lease_name(self.study_id, kind, key), None)
        if got is not None:
            try:
                self.storage.delete_study(got[0])
            except KeyError:  # reaped by someone who took us for dead
                pass

    def holder_of(self, kind: str, key: str) -> dict[str, Any] | None:
        """The holder record of the lease ``kind:key`` as stored now (None: free, or no holder yet)."""
        info = self._read(lease_name(self.study_id, kind, key))
        return None if info is None else info.holder

    def holds(self, kind: str, key: str) -> bool:
        with self._lock:
            return lease_name(self.study_id, kind, key) in self._held

    # -- what others hold ------------------------------------------------------------------------
    def list(self, kind: str | None = None) -> list[LeaseInfo]:
        """Every lease of this study (of ``kind``), live or not, as stored now."""
        prefix = f"{PREFIX}:{self.study_id}:"
        out = []
        for s in self.storage.get_all_studies():
            if not s.study_name.startswith(prefix):
                continue
            k, key = s.study_name[len(prefix) :].split(":", 1)
            if kind is None or k == kind:
                holder = s.user_attrs.get("holder")
                # FrozenStudy has no public id; _study_id is the storage's id (Optuna 3 to 5).
                out.append(LeaseInfo(k, key, s._study_id, dict(holder) if holder else None))
        return out

    def live(self, kind: str, *, reap: bool = True, wait: bool = False) -> list[LeaseInfo]:
        """Leases of ``kind`` held by live processes other than this one; dead ones are reaped,
        except slots (see :meth:`reap_dead`).  A lease whose holder record is not written
        yet counts as live, unless ``wait`` gives it :data:`ORPHAN_GRACE_S` to show up."""
        with self._lock:
            mine = {lid for lid, _ in self._held.values()}
        out = []
        for info in self.list(kind):
            if info.lease_id in mine:
                continue
            if self._alive(info, wait=wait):
                out.append(info)
            elif reap and kind != SLOT:
                self.reap(info)
        return out

    def reap_dead(self, *, wait: bool = False) -> int:
        """Reap every lease of this study whose holder is dead; returns how many.

        A dead worker's slot lease stays: it marks a budget left unfinished, which the next
        process to start takes over (:meth:`claim_slot`) rather than a fresh slot.  A lease
        without a holder record is reaped only with ``wait`` (it gets :data:`ORPHAN_GRACE_S`)."""
        n = 0
        for info in self.list():
            if info.kind != SLOT and not self.holds(info.kind, info.key) and not self._alive(info, wait=wait):
                self.reap(info)
                n += 1
        return n

    def claim_slot(self, *, max_slots: int = 4096) -> int:
        """Take a slot: one whose holder died first (resume its budget), else the lowest
        free one.  Returns the slot number."""
        taken = set()
        for info in sorted(self.list(SLOT), key=lambda i: int(i.key) if i.key.isdigit() else -1):
            if not info.key.isdigit():
                continue
            if self._alive(info, wait=False):  # a slot just taken by a starting worker is taken
                taken.add(int(info.key))
                continue
            self.reap(info)
            if self.acquire(SLOT, info.key):
                return int(info.key)
        for k in range(max_slots):
            if k not in taken and self.acquire(SLOT, str(k)):
                return k
        raise RuntimeError(f"no free slot among {max_slots} in study id {self.study_id}")

    # -- heartbeat -------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self._thread is not None or self.heartbeat_s <= 0:
            return
        self._thread = threading.Thread(target=self._beat, name="qflash-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                held = list(self._held.values())
            for lease_id, holder in held:
                holder["heartbeat"] = time.time()
                try:
                    self.storage.set_study_user_attr(lease_id, "holder", dict(holder))
                except Exception:  # noqa: BLE001 - released meanwhile, or the server blinked: retry next beat
                    pass

    def close(self) -> None:
        """Stop the heartbeat and release every lease still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._lock:
            held = list(self._held.items())
            self._held.clear()
        for _, (lease_id, _) in held:
            try:
                self.storage.delete_study(lease_id)
            except KeyError:
                pass

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- every lease of a storage (the next run's sweep, qflash-db leases) ---------------------------------
@dataclasses.dataclass(frozen=True)
class StoredLease:
    """A lease study as found in a storage, with what became of its study and holder."""

    name: str
    study_id: int  # the study it belongs to
    study: str | None  # that study's name; None when it was deleted (an orphan lease)
    info: LeaseInfo
    alive: bool  # its holder is alive (a lease without a holder record counts as alive)


def stored_leases(storage: Any) -> list[StoredLease]:
    """Every lease study in ``storage`` (any study's), oldest study first."""
    storage = as_backend(storage)
    studies = storage.get_all_studies()
    names = {s._study_id: s.study_name for s in studies if not is_lease_name(s.study_name)}
    out = []
    for s in studies:
        if not is_lease_name(s.study_name):
            continue
        try:
            sid, kind, key = s.study_name[len(PREFIX) + 1 :].split(":", 2)
            study_id = int(sid)
        except ValueError:
            continue  # not one of ours
        holder = s.user_attrs.get("holder")
        info = LeaseInfo(kind, key, s._study_id, dict(holder) if holder else None)
        alive = info.holder is None or holder_alive(info.holder)
        out.append(StoredLease(s.study_name, study_id, names.get(study_id), info, alive))
    return sorted(out, key=lambda x: (x.study_id, x.info.kind, x.info.key))


def clean(storage: Any, *, slots: bool = True, dry_run: bool = False) -> list[StoredLease]:
    """Remove the leases whose holder is dead, and every lease of a deleted study; returns them.

    ``slots=False`` keeps dead slot leases of existing studies: each marks a budget left
    unfinished, which the next run of that study resumes (:meth:`Leases.claim_slot`); without
    it a rerun takes the lowest free slot.  A dead holder's RUNNING trial is failed, as when a
    run reaps it."""
    storage = as_backend(storage)
    gone = []
    for lease in stored_leases(storage):
        orphan = lease.study is None
        if not orphan and (lease.alive or (lease.info.kind == SLOT and not slots)):
            continue
        if not dry_run:
            if orphan:
                try:
                    storage.delete_study(lease.info.lease_id)
                except KeyError:
                    pass
            else:
                Leases(storage, lease.study_id, heartbeat_s=0).reap(lease.info)
        gone.append(lease)
    return gone


def forget_sweeps() -> None:
    """Let the next :func:`sweep_once` of every storage sweep again (a long-lived process, tests)."""
    _swept.clear()


def sweep_once(storage: Any) -> int:
    """:func:`clean` without slots, once per storage and process (a run calls it when it opens a
    study): leases a killed run left in studies this run does not open go too.  Returns how many."""
    storage = as_backend(storage)
    key = f"{type(storage).__name__}:{id(storage)}"
    if key in _swept:
        return 0
    _swept.add(key)
    return len(clean(storage, slots=False))
