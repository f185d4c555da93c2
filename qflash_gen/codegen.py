"""Render `templates/qflash_fwd.py.jinja` for a `KernelConfig`, write it to the cache, import it.

Rendering is pure: the same config gives the same bytes (no dates, no paths).  The rendered file
opens with a header naming the template and its hash, the package version and the config (YAML)
with its hash, so a file found on disk explains itself.  Triton needs a real source file to JIT
from, so the text is written atomically to ``<cache>/<hash[:2]>/<hash>.py`` and imported there.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import jinja2
import yaml

from qflash_gen import __version__
from qflash_gen.config import KernelConfig

TEMPLATE_NAME = "qflash_fwd.py.jinja"
TEMPLATE_FILES = ("qflash_fwd.py.jinja", "exp2.py.jinja", "rescale.py.jinja")
KERNEL_NAME = "_qflash_fwd"


@functools.lru_cache(maxsize=1)
def _template_dir() -> importlib.resources.abc.Traversable:
    """Installed: the ``qflash_gen.templates`` resource package (pyproject maps templates/ there).
    Plain checkout on sys.path (no install): ``<repo>/templates``."""
    try:
        return importlib.resources.files("qflash_gen.templates")
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parents[1] / "templates"
        if (checkout / TEMPLATE_NAME).is_file():
            return checkout
        raise


def _load_template_source(name: str) -> tuple[str, str, None]:
    path = _template_dir() / name
    if not path.is_file():
        raise jinja2.TemplateNotFound(name)
    return path.read_text(encoding="utf-8"), f"templates/{name}", None


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # FunctionLoader keeps the templates behind importlib.resources, so a wheel install works.
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: _load_template_source(name)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )


@functools.lru_cache(maxsize=1)
def template_hash() -> str:
    """sha256 over all template files (names and bytes): what makes a DB entry stale."""
    h = hashlib.sha256()
    for name in TEMPLATE_FILES:
        h.update(name.encode())
        h.update((_template_dir() / name).read_bytes())
    return h.hexdigest()


def _header(config: KernelConfig) -> str:
    cfg_yaml = yaml.safe_dump(config.to_dict(), sort_keys=True).rstrip()
    lines = [
        '"""qflash-gen integer FlashAttention forward kernel (generated: do not edit).',
        "",
        f"template: {TEMPLATE_NAME}  sha256:{template_hash()[:16]}",
        f"qflash-gen: {__version__}",
        f"config sha256: {config.hash}",
        "config:",
        *("    " + line for line in cfg_yaml.splitlines()),
        '"""',
    ]
    return "\n".join(lines)


def render(config: KernelConfig) -> str:
    """The Triton source for ``config`` (pure: same config, same text)."""
    if not isinstance(config, KernelConfig):
        raise ValueError(f"render() expects a KernelConfig, got {type(config).__name__}")
    template = _environment().get_template(TEMPLATE_NAME)
    return template.render(config=config, header=_header(config))


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def cache_dir() -> Path:
    """``$QFLASH_GEN_CACHE``, else the user cache dir (platformdirs) + ``/kernels``."""
    env = os.environ.get("QFLASH_GEN_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("qflash-gen")) / "kernels"


def write_source(source: str) -> Path:
    """Write ``source`` to ``<cache>/<h[:2]>/<h>.py`` atomically (temp file + rename)."""
    digest = source_hash(source)
    path = cache_dir() / digest[:2] / f"{digest}.py"
    if path.is_file() and path.read_text(encoding="utf-8") == source:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(source)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()


def load(config: KernelConfig) -> ModuleType:
    """Render, write and import the kernel module for ``config`` (cached in-process)."""
    key = config.hash
    module = _modules.get(key)
    if module is not None:
        return module
    with _lock:
        module = _modules.get(key)
        if module is None:
            source = render(config)
            path = write_source(source)
            name = f"qflash_gen_kernels._k{source_hash(source)[:20]}"
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:  # pragma: no cover - importlib contract
                raise ImportError(f"cannot import rendered kernel {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            module.SOURCE = source
            module.PATH = path
            _modules[key] = module
    return module
