"""Code generation: the Triton source of a `KernelConfig`, and what is built from it.

* :mod:`.render` -- the Jinja templates rendered for a config (pure), and the template hash;
* :mod:`.signature` -- the kernel's argument list, described once for every launcher;
* :mod:`.artifacts` -- atomic writes, the content-addressed kernel files and the module cache;
* :mod:`.asm` -- compiling a rendered kernel down to TTIR ... SASS (``qflash-show --asm``).
"""

from qflash_gen.codegen.artifacts import atomic_write, cache_dir, import_source, load, source_hash, write_source
from qflash_gen.codegen.render import (
    KERNEL_NAME,
    TEMPLATE_FILES,
    TEMPLATE_NAME,
    TemplateLocationError,
    render,
    single_pass_tiles,
    template_dir,
    template_hash,
)

__all__ = [
    "KERNEL_NAME",
    "TEMPLATE_FILES",
    "TEMPLATE_NAME",
    "TemplateLocationError",
    "atomic_write",
    "cache_dir",
    "import_source",
    "load",
    "render",
    "single_pass_tiles",
    "source_hash",
    "template_dir",
    "template_hash",
    "write_source",
]
