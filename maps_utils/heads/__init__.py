"""Architecture adapters: per-head OV weights, embeddings and hook points for every family.

Everything that differs between architectures lives in the adapter table (:data:`ADAPTERS`), one
:class:`~.spec.ArchSpec` per family of tiny accessors, grouped by kind in :mod:`.classic`, :mod:`.llama` and
:mod:`.gemma`. The rest of the package only talks to :class:`HeadWeights` and never branches on the model type.

- :mod:`.head_weights`: :class:`HeadWeights`, one model's heads read through its adapter.
- :mod:`.ov`: :class:`OVCircuit`, one layer's OV maps kept factored.
- :mod:`.registry`: which adapter reads which ``model_type``; the generic Llama-like adapter for unlisted models.
- :mod:`.parity`: the adapter against the model's own forward pass; an unlisted model is read only once it passes.
- :mod:`.hooks`: forward passes that stop as soon as the hooks have what they need.
"""

from .head_weights import HeadWeights, dims_of
from .ov import OVCircuit
from .registry import ADAPTERS, SUPPORTED_MODEL_TYPES, generic_spec, spec_for
from .spec import ArchSpec, Dims

__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "ArchSpec", "Dims", "HeadWeights", "OVCircuit", "dims_of",
           "generic_spec", "spec_for"]
