"""The YAML tuning database: one file per GPU, a shipped read-only layer and a user layer on top.

Why YAML: the DB is shipped in the wheel and reviewed in pull requests, so a person must be able
to read an entry, see where it came from and diff two versions.  Field meanings, the inputs that
make an entry stale and the known limitations: ``tuning_db/README.md``; the design:
docs/design.md, "Tuning DB".

File layout (``<dir>/<gpu>.yaml``)::

    schema_version: 2
    header:            # the GPU, the software of the last write, entry_count (proves it whole)
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
    FRESH,
    OTHER_TEMPLATE,
    OTHER_TRITON,
    SCHEMA_VERSION,
    SOFTWARE_FIELDS,
    TIER_LABELS,
    TIERS,
    DBError,
    DBFile,
    Entry,
    Fallback,
    Header,
    StaleEntry,
    WriteReport,
    file_name,
    gpu_of_file,
    running_software,
    software_label,
    stale_reason,
    tier_of,
    triton_minor,
)
from qflash_gen.db.store import (
    ENV_DB_DIR,
    TuningDB,
    is_file_layer,
    layer_file,
    shipped_db_dir,
    user_db_dir,
    user_db_location,
    user_db_path,
)

__all__ = [
    "ENV_DB_DIR",
    "FRESH",
    "LOCK_TIMEOUT_S",
    "OTHER_TEMPLATE",
    "OTHER_TRITON",
    "SCHEMA_VERSION",
    "SOFTWARE_FIELDS",
    "TIERS",
    "TIER_LABELS",
    "DBError",
    "DBFile",
    "Entry",
    "Fallback",
    "Header",
    "StaleEntry",
    "TuningDB",
    "WriteReport",
    "file_name",
    "generation",
    "gpu_of_file",
    "is_file_layer",
    "layer_file",
    "load_file",
    "raw_configs",
    "running_software",
    "shipped_db_dir",
    "software_label",
    "stale_reason",
    "tier_of",
    "triton_minor",
    "user_db_dir",
    "user_db_location",
    "user_db_path",
    "write_entries",
]
