"""Render ``templates/qflash_fwd.py.jinja`` for a `KernelConfig`.

Rendering is pure: the same render fields give the same bytes (no dates, no paths).  Everything
the template needs is computed here in Python and passed in as plain values (dtypes, the tile
list of the single pass, the kernel's parameter list from :mod:`.signature`); Jinja only picks
structure (which exp and rescale helpers exist, single pass vs online loop).  The rendered file
opens with a header naming the template and its hash, the package version and the config's
render fields with their hash, so a file found on disk explains itself.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from pathlib import Path

import jinja2
import yaml

from qflash_gen.codegen import signature
from qflash_gen.config import LAUNCH_FIELDS, KernelConfig
from qflash_gen.version import __version__

TEMPLATE_NAME = "qflash_fwd.py.jinja"
TEMPLATE_FILES = ("qflash_fwd.py.jinja", "exp2.py.jinja", "rescale.py.jinja")
KERNEL_NAME = "_qflash_fwd"
SINGLE_PASS_GRAIN = 32  # single pass: keys are rounded up to this many (an int8 MMA needs K >= 32)


class TemplateLocationError(RuntimeError):
    """The templates beside the imported ``qflash_gen`` cannot be found."""


def _beside_package() -> tuple[Path, Path]:
    """The two places templates sit beside the imported package: ``qflash_gen/templates`` (an
    installed wheel: the ``qflash_gen.templates`` resource package) and ``<repo>/templates``
    (a checkout, editable install or plain copy on sys.path)."""
    package = Path(__file__).resolve().parents[1]
    return package / "templates", package.parent / "templates"


@functools.lru_cache(maxsize=1)
def template_dir() -> importlib.resources.abc.Traversable:
    """Where the templates are read from: beside the imported ``qflash_gen``, never elsewhere.

    Installed: the ``qflash_gen.templates`` resource package (pyproject maps templates/ there).
    A checkout: ``<repo>/templates``.  The resource package alone is not trusted: with an edited
    copy of the repository on PYTHONPATH, ``qflash_gen`` comes from the copy while an editable
    install's finder still maps ``qflash_gen.templates`` to *its* checkout, whose templates would
    render silently.  A copy without templates beside it is a :class:`TemplateLocationError`."""
    beside = _beside_package()
    for folder in beside:
        if (folder / TEMPLATE_NAME).is_file():
            return folder
    try:
        resource = importlib.resources.files("qflash_gen.templates")
    except ModuleNotFoundError:
        resource = None
    if resource is not None and not isinstance(resource, Path) and (resource / TEMPLATE_NAME).is_file():
        return resource  # a zip import: the package and its resources come from one archive
    elsewhere = f"; qflash_gen.templates resolves to {resource}, another copy's" if resource is not None else ""
    raise TemplateLocationError(
        f"qflash_gen is imported from {beside[0].parent} but no {TEMPLATE_NAME} sits beside it "
        f"(looked in {beside[0]} and {beside[1]}){elsewhere}: refusing to render templates that are "
        "not this package's.  Put templates/ next to the qflash_gen/ you import, or install that copy."
    )


def _load_template_source(name: str) -> tuple[str, str, None]:
    path = template_dir() / name
    if not path.is_file():
        raise jinja2.TemplateNotFound(name)
    return path.read_text(encoding="utf-8"), f"templates/{name}", None


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # FunctionLoader keeps the templates behind importlib.resources, so a wheel install works.
    return jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template_source),
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
        h.update((template_dir() / name).read_bytes())
    return h.hexdigest()


def single_pass_tiles(block_n: int) -> tuple[int, ...]:
    """Key tiles of the single pass, largest first: ``block_n`` halved down to the grain
    (``min(32, block_n)``).  The kernel runs the tiles whose bit is set in N rounded up to the
    grain (N = 197 at block_n 256: 128 + 64 + 32 keys)."""
    grain = min(SINGLE_PASS_GRAIN, block_n)
    tiles = []
    t = block_n
    while t >= grain:
        tiles.append(t)
        t //= 2
    return tuple(tiles)


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
        f"launch options, not part of this file: {', '.join(LAUNCH_FIELDS)}",
        '"""',
    ]
    return "\n".join(lines)


def render(config: KernelConfig) -> str:
    """The Triton source for ``config`` (pure: it depends on the render fields only, so configs
    that differ in launch fields render the same text)."""
    if not isinstance(config, KernelConfig):
        raise ValueError(f"render() expects a KernelConfig, got {type(config).__name__}")
    config = config.render_part()
    grain = min(SINGLE_PASS_GRAIN, config.block_n)
    template = _environment().get_template(TEMPLATE_NAME)
    return template.render(
        config=config,
        header=_header(config),
        acc=f"tl.int{config.acc_bits}",
        p_max=config.p_max,
        grain=grain,
        tiles=single_pass_tiles(config.block_n),
        kernel_params=signature.render_params(),
    )
