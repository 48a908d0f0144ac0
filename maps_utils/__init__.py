"""maps_utils: the helper package of the MAPS study (Elhelo & Geva, ACL 2025).

Each attention head's OV circuit is read as a vocabulary-to-vocabulary map
M = E · W_V · W_O · U. This package loads models (:mod:`.models`), exposes per-head
weights for every supported architecture (:mod:`.heads`), and — in later modules —
scores relations, correlates with inference, ablates heads and describes them.
Nothing here touches devices, seeds or the network at import time.
"""

from .errors import MapsError, ModelNotFoundError, ModelPackageMissingError, UnsupportedArchitectureError
from .heads import ADAPTERS, SUPPORTED_MODEL_TYPES, HeadWeights
from .models import DEFAULT_MODEL, EMBEDDED, LoadedModel, available_models, default_cache_dir, load

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "SUPPORTED_MODEL_TYPES",
    "HeadWeights",
    "LoadedModel",
    "MapsError",
    "ModelNotFoundError",
    "ModelPackageMissingError",
    "UnsupportedArchitectureError",
    "available_models",
    "default_cache_dir",
    "load",
]
