"""Where the DB lives: the shipped read-only layer, the user layer on top, and :class:`TuningDB`.

``TuningDB.default()`` reads the shipped DB (``qflash_gen.tuning_db`` resource package, or
``<repo>/tuning_db`` in a checkout) and then the user DB (``$QFLASH_GEN_DB``, default
``<user cache dir>/qflash-gen/tuning_db``); a user entry overrides a shipped one with the same
key.  Writes go to the user layer only.

A layer is a folder of ``<gpu>.yaml`` files, or one such file (``QFLASH_GEN_DB=~/db/h100.yaml``,
``qflash-db --db h100.yaml``): a file layer holds that GPU only.  A ``<gpu>.yaml`` that is not a
readable file (a folder of that name, no read permission) is an error naming it, never skipped.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from qflash_gen.db.files import load_file, write_entries
from qflash_gen.db.schema import FILE_SUFFIX, FILE_SUFFIXES, FRESH, DBError, Entry, Header, WriteReport, file_name
from qflash_gen.gpu import is_valid_gpu_name
from qflash_gen.keys import WorkloadKey

ENV_DB_DIR = "QFLASH_GEN_DB"
logger = logging.getLogger("qflash_gen.db")
_told: set[tuple[Path, str]] = set()

# -- locations and the layered DB ----------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def shipped_db_dir() -> Path:
    """The read-only DB shipped with the package, beside the imported ``qflash_gen``: its
    ``tuning_db`` folder in a wheel (the ``qflash_gen.tuning_db`` resource package), or
    ``<repo>/tuning_db`` in a checkout.  The resource package is not trusted on its own: with an
    edited copy of the repository on PYTHONPATH, an editable install's finder would still map it
    to *its* checkout (as for the templates, codegen.render.template_dir)."""
    package = Path(__file__).resolve().parents[1]  # the imported qflash_gen/
    for folder in (package / "tuning_db", package.parent / "tuning_db"):
        if folder.is_dir():
            return folder
    try:
        candidate = Path(str(importlib.resources.files("qflash_gen.tuning_db")))
        if candidate.is_dir() and candidate.parent in (package, package.parent):
            return candidate
    except (ModuleNotFoundError, TypeError):
        pass
    return package.parent / "tuning_db"  # a checkout without it: an empty shipped layer


def is_file_layer(path: str | os.PathLike[str]) -> bool:
    """A layer path that names one DB file (``.yaml``/``.yml``, not an existing folder)."""
    path = Path(path)
    return path.suffix in FILE_SUFFIXES and not path.is_dir()


def _check_file_layer(path: Path, what: str) -> None:
    if path.suffix != FILE_SUFFIX or not is_valid_gpu_name(path.stem):
        raise ValueError(
            f"{what}={path}: a DB file is named <gpu>{FILE_SUFFIX} with a short GPU name ([a-z0-9_], e.g. "
            f"h100{FILE_SUFFIX}); or name the folder that holds such files"
        )


def user_db_location() -> Path:
    """``$QFLASH_GEN_DB`` as given (a folder, or one ``<gpu>.yaml`` file), else
    ``<user cache dir>/qflash-gen/tuning_db``.  ValueError naming the variable for a file with
    another name."""
    env = os.environ.get(ENV_DB_DIR)
    if not env:
        return _default_user_db_dir()
    path = Path(env).expanduser()
    if is_file_layer(path):
        _check_file_layer(path, ENV_DB_DIR)
    return path


def user_db_dir() -> Path:
    """The folder of the user DB: ``$QFLASH_GEN_DB`` (its folder when it names a file), else
    ``<user cache dir>/qflash-gen/tuning_db``."""
    path = user_db_location()
    return path.parent if is_file_layer(path) else path


def user_db_path(gpu: str) -> Path:
    """Where a write of ``gpu``'s entries to the user DB goes (``qflash-tune`` without ``--db``)."""
    return layer_file(user_db_location(), gpu, what=ENV_DB_DIR)


def layer_file(layer: str | os.PathLike[str], gpu: str, *, what: str = "layer") -> Path:
    """``<layer>/<gpu>.yaml``, or the layer itself when it is that GPU's file (ValueError naming
    ``what`` when it is another GPU's file)."""
    layer = Path(layer)
    if not is_file_layer(layer):
        return layer / file_name(gpu)
    if layer.stem != gpu:
        raise ValueError(f"{what}={layer} is the DB file of gpu {layer.stem!r}; entries for {gpu!r} need their own")
    return layer


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
        for d in self.dirs:
            if is_file_layer(d):
                _check_file_layer(d, "layer")
        self.write_dir = Path(write_dir) if write_dir is not None else self.dirs[-1]

    @classmethod
    def default(cls) -> TuningDB:
        return cls([shipped_db_dir(), user_db_location()])

    def __repr__(self) -> str:
        return f"TuningDB(dirs={[str(d) for d in self.dirs]}, write_dir={str(self.write_dir)!r})"

    def path(self, gpu: str) -> Path:
        """Where a write for ``gpu`` goes."""
        return layer_file(self.write_dir, gpu, what="write layer")

    def files(self, gpu: str) -> list[Path]:
        """Existing DB files for ``gpu``, lowest priority first.  A ``<gpu>.yaml`` that exists
        but is not a file (a folder of that name) is a DBError: skipping it would silently
        give the default."""
        out = []
        for d in self.dirs:
            if is_file_layer(d) and d.stem != gpu:
                if (d, gpu) not in _told:  # not silent: a user DB file for another card
                    _told.add((d, gpu))
                    logger.warning("%s holds gpu %r's DB only: gpu %r reads no entries from it", d, d.stem, gpu)
                continue
            p = layer_file(d, gpu)
            if p.is_file():
                out.append(p)
            elif p.exists():
                raise DBError("is not a file (a folder of that name?): the DB of this GPU cannot be read", p)
        return out

    def gpus(self) -> list[str]:
        """GPUs with a DB file in any layer."""
        names = set()
        for d in self.dirs:
            if is_file_layer(d):
                names.update([d.stem] if d.exists() else [])
            elif d.is_dir():
                names.update(p.stem for p in d.glob(f"*{FILE_SUFFIX}") if is_valid_gpu_name(p.stem))
        return sorted(names)

    def located(self, gpu: str, tier: str = FRESH) -> dict[WorkloadKey, tuple[Entry, Path]]:
        """Usable entries of ``tier`` (``db.TIERS``) for ``gpu`` with the file each came from
        (layers overlaid: a higher layer's entry wins within the tier)."""
        out: dict[WorkloadKey, tuple[Entry, Path]] = {}
        for path in self.files(gpu):
            f = load_file(path)
            for key, entry in f.tier(tier).items():
                out[key] = (entry, path)
        return out

    def entries(self, gpu: str) -> dict[WorkloadKey, Entry]:
        """Fresh entries for ``gpu`` (layers overlaid; others are fallbacks or stale, logged)."""
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
