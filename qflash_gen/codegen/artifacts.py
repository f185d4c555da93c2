"""Files the package writes, and the rendered-module cache.

:func:`atomic_write` is the one way a file is written here (rendered kernels, tuning DB files,
Pareto fronts): a temp file in the same folder, flushed and fsynced, then ``os.replace``, so a
reader sees the old file or the new one, never half of one.

Rendered kernels are content-addressed: ``<cache>/<sha[:2]>/<sha>.py`` with ``sha`` the sha256
of the source (Triton needs a real file to JIT from).  :func:`load` imports the module for a
config, cached in-process by the config's render fields (``KernelConfig.render_key``): configs
that differ only in launch fields (``max_regs``, ``heads_per_program``) share one module object.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from qflash_gen.codegen.render import render
from qflash_gen.config import KernelConfig

ENV_CACHE = "QFLASH_GEN_CACHE"


def atomic_write(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` (folders created) atomically: temp file, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def cache_dir() -> Path:
    """``$QFLASH_GEN_CACHE``, else the user cache dir (platformdirs) + ``/kernels``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("qflash-gen")) / "kernels"


def write_source(source: str) -> Path:
    """``<cache>/<h[:2]>/<h>.py`` holding ``source`` (written atomically unless already there)."""
    digest = source_hash(source)
    path = cache_dir() / digest[:2] / f"{digest}.py"
    if path.is_file() and path.read_text(encoding="utf-8") == source:
        return path
    return atomic_write(path, source)


def import_source(source: str, prefix: str = "_k") -> ModuleType:
    """Write ``source`` to the cache and import it as ``qflash_gen_kernels.<prefix><sha[:20]>``
    (the same name again returns the module already imported)."""
    name = f"qflash_gen_kernels.{prefix}{source_hash(source)[:20]}"
    if name in sys.modules:
        return sys.modules[name]
    path = write_source(source)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - importlib contract
        raise ImportError(f"cannot import rendered kernel {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.SOURCE = source
    module.PATH = path
    return module


_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()


def load(config: KernelConfig) -> ModuleType:
    """The imported kernel module for ``config`` (rendered, written and imported on first use;
    cached in-process by ``config.render_key``)."""
    key = config.render_key
    module = _modules.get(key)
    if module is not None:
        return module
    with _lock:
        module = _modules.get(key)
        if module is None:
            module = import_source(render(config))
            _modules[key] = module
    return module
