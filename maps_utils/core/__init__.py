"""The ground floor: errors, atomic storage, result folders, manifests, content hashes, parameter ranges, paths.

- :mod:`.errors`: :class:`MapsError` and its kinds: one sentence naming the fix, no traceback in notebooks.
- :mod:`.io`: atomic writes, file locks, storage faults mapped to one sentence.
- :mod:`.store`: where results live (:class:`RunOptions`), per-slot caches (:class:`Slots`), verified tables.
- :mod:`.manifest`: what produced a table, and the record that catches a table changed after it was written.
- :mod:`.hashing`: content keys and file hashes (weights included) that key every cache.
- :mod:`.params`: every numeric MAPS parameter's range, checked in one place.
- :mod:`.paths`: the model cache folder.
- :mod:`.deprecation`: renamed public names, kept for one release with a DeprecationWarning naming the new one.

Nothing here knows about models, heads or relations.
"""

from .errors import (
           MapsError,
           ModelNotFoundError,
           ModelPackageMissingError,
           OptionError,
           UnsupportedArchitectureError,
)
from .hashing import content_key, file_sha256
from .io import StorageError, atomic_file, atomic_write_text
from .manifest import DerivedFileError, build_manifest, read_manifest, write_manifest
from .params import RANGES, check_namespace, check_parameters
from .paths import default_cache_dir
from .store import RunOptions, Slots, read_table, result_folder, write_table

__all__ = ["RANGES", "DerivedFileError", "MapsError", "ModelNotFoundError", "ModelPackageMissingError", "OptionError",
           "RunOptions", "Slots", "StorageError", "UnsupportedArchitectureError", "atomic_file", "atomic_write_text",
           "build_manifest", "check_namespace", "check_parameters", "content_key", "default_cache_dir", "file_sha256",
           "read_manifest", "read_table", "result_folder", "write_manifest", "write_table"]
