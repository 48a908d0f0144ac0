"""Architecture adapters: per-head OV weights, embeddings and hook points for every family.

Everything that differs between architectures lives in the adapter table (:data:`ADAPTERS`), one
:class:`~.spec.ArchSpec` per family of tiny accessors, grouped by kind in :mod:`.classic`, :mod:`.llama` and
:mod:`.gemma`. The rest of the package only talks to :class:`HeadWeights` and never branches on the model type.
Unlisted decoder-only models built like Llama are read by a generic adapter once the parity checks
(:mod:`.parity`) pass on the loaded model itself.
"""

from .head_weights import HeadWeights, dims_of
from .registry import ADAPTERS, SUPPORTED_MODEL_TYPES, generic_spec, spec_for
from .spec import ArchSpec, Dims

__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "ArchSpec", "Dims", "HeadWeights", "dims_of", "generic_spec",
           "spec_for"]
