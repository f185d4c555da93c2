"""The console scripts ``qflash-show`` (:mod:`.show`) and ``qflash-db`` (:mod:`.db`, with
``report`` in :mod:`.report`), thin commands over the package's public functions; what they
share (errors and exit codes, output, parsers) is in :mod:`.common`."""

from qflash_gen.cli.common import CommandError, UsageError, parse_arch, parse_config, parse_shape
from qflash_gen.cli.db import main as db_main
from qflash_gen.cli.show import main as show_main

__all__ = ["CommandError", "UsageError", "db_main", "parse_arch", "parse_config", "parse_shape", "show_main"]
