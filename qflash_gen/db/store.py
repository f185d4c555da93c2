"""Where the DB lives: the shipped read-only layer, the user layer on top, and :class:`TuningDB`.

``TuningDB.default()`` reads the shipped DB (``qflash_gen.tuning_db`` resource package, or
``<repo>/tuning_db`` in a checkout) and then the user DB (``$QFLASH_GEN_DB``, default
``<user cache dir>/qflash-gen/tuning_db``); a user entry overrides a shipped one with the same
key.  Writes go to the user layer only.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from qflash_gen.db.files import load_file, write_entries
from qflash_gen.db.schema import FILE_SUFFIX, Entry, Header, WriteReport, file_name
from qflash_gen.gpu import is_valid_gpu_name
from qflash_gen.keys import WorkloadKey

ENV_DB_DIR = "QFLASH_GEN_DB"

# -- locations and the layered DB ----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def shipped_db_dir() -> Path:
    """The read-only DB shipped with the package: resource package ``qflash_gen.tuning_db``,
    else ``<repo>/tuning_db`` when running from a checkout that does not map it."""
    try:
        res = importlib.resources.files("qflash_gen.tuning_db")
        candidate = Path(str(res))
        if candidate.is_dir():
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "tuning_db"


def user_db_dir() -> Path:
    """``$QFLASH_GEN_DB`` (a directory), else ``<user cache dir>/qflash-gen/tuning_db``."""
    env = os.environ.get(ENV_DB_DIR)
    if env:
        return Path(env).expanduser()
    return _default_user_db_dir()


@functools.lru_cache(maxsize=1)
def _default_user_db_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("qflash-gen")) / "tuning_db"


class TuningDB:
    """Layered DB: ``dirs`` from lowest to highest priority; writes go to ``write_dir`` (default: the last).

    ``TuningDB.default()`` is (shipped, user).  A key found in several layers comes from the
    highest one: a user's own measurement beats the shipped one, even if slower on paper."""

    def __init__(self, dirs: Sequence[str | os.PathLike], *, write_dir: str | os.PathLike | None = None) -> None:
        if isinstance(dirs, (str, os.PathLike)) or not dirs:
            raise ValueError("dirs must be a non-empty sequence of directories (lowest priority first)")
        self.dirs: tuple[Path, ...] = tuple(Path(d) for d in dirs)
        self.write_dir = Path(write_dir) if write_dir is not None else self.dirs[-1]

    @classmethod
    def default(cls) -> TuningDB:
        return cls([shipped_db_dir(), user_db_dir()])

    def __repr__(self) -> str:
        return f"TuningDB(dirs={[str(d) for d in self.dirs]}, write_dir={str(self.write_dir)!r})"

    def path(self, gpu: str) -> Path:
        """Where a write for ``gpu`` goes."""
        return self.write_dir / file_name(gpu)

    def files(self, gpu: str) -> list[Path]:
        """Existing DB files for ``gpu``, lowest priority first."""
        return [p for p in (d / file_name(gpu) for d in self.dirs) if p.is_file()]

    def gpus(self) -> list[str]:
        """GPUs with a DB file in any layer."""
        names = {p.stem for d in self.dirs if d.is_dir() for p in d.glob(f"*{FILE_SUFFIX}") if is_valid_gpu_name(p.stem)}
        return sorted(names)

    def located(self, gpu: str) -> dict[WorkloadKey, tuple[Entry, Path]]:
        """Usable entries for ``gpu`` with the file each came from (layers overlaid)."""
        out: dict[WorkloadKey, tuple[Entry, Path]] = {}
        for path in self.files(gpu):
            f = load_file(path)
            for key, entry in f.entries.items():
                out[key] = (entry, path)
        return out

    def entries(self, gpu: str) -> dict[WorkloadKey, Entry]:
        """Usable entries for ``gpu`` (layers overlaid; stale ones skipped and logged)."""
        return {k: e for k, (e, _) in self.located(gpu).items()}

    def lookup(self, gpu: str, key: WorkloadKey) -> Entry | None:
        return self.entries(gpu).get(key)

    def write(
        self,
        gpu: str,
        entries: Iterable[Entry],
        *,
        force: bool = False,
        search_space_hash: str | None = None,
        header: Header | None = None,
    ) -> WriteReport:
        """Merge ``entries`` into ``<write_dir>/<gpu>.yaml`` (see :func:`write_entries`)."""
        if not is_valid_gpu_name(gpu):
            raise ValueError(f"gpu={gpu!r} must be a short GPU name ([a-z0-9_], see qflash_gen.gpu)")
        return write_entries(
            self.path(gpu), entries, gpu=gpu, header=header, force=force, search_space_hash=search_space_hash
        )
