"""The YAML tuning database: one file per GPU, a shipped read-only layer and a user layer on top.

Why YAML: the DB is shipped in the wheel and reviewed in pull requests, so a person must be able
to read an entry, see where it came from and diff two versions.  Field meanings, the inputs that
make an entry stale and the known limitations: ``tuning_db/README.md``; the design:
docs/design.md, "Tuning DB".

File layout (``<dir>/<gpu>.yaml``)::

    schema_version: 1
    header:            # the GPU, and the software of the last write
      gpu: h100
      ...
    entries:
    - key: n197_d64_nomask_bh64_fp16-fp16
      config: {block_m: 64, block_n: 256, ...}     # KernelConfig.to_dict(), never str(config)
      latency_us: 11.8
      ...
      software: {triton: 3.5.1}                     # only where it differs from the header

Modules: :mod:`.schema` (records, fingerprint, staleness), :mod:`.parse` (reading with line
numbers), :mod:`.files` (load, locked atomic merge-write), :mod:`.store` (layers, ``TuningDB``).
"""

from qflash_gen.db.files import LOCK_TIMEOUT_S, generation, load_file, raw_configs, write_entries
from qflash_gen.db.schema import (
    SCHEMA_VERSION,
    SOFTWARE_FIELDS,
    DBError,
    DBFile,
    Entry,
    Header,
    StaleEntry,
    WriteReport,
    file_name,
    gpu_of_file,
    running_software,
    stale_reason,
    triton_minor,
)
from qflash_gen.db.store import ENV_DB_DIR, TuningDB, shipped_db_dir, user_db_dir

__all__ = [
    "ENV_DB_DIR",
    "LOCK_TIMEOUT_S",
    "SCHEMA_VERSION",
    "SOFTWARE_FIELDS",
    "DBError",
    "DBFile",
    "Entry",
    "Header",
    "StaleEntry",
    "TuningDB",
    "WriteReport",
    "file_name",
    "generation",
    "gpu_of_file",
    "load_file",
    "raw_configs",
    "running_software",
    "shipped_db_dir",
    "stale_reason",
    "triton_minor",
    "user_db_dir",
    "write_entries",
]
