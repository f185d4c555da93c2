"""Jinja templates of the qflash-gen kernel (a resource package: qflash_gen.templates)."""
