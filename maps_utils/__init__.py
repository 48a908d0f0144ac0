"""maps_utils: the helper package of the MAPS study (Elhelo & Geva, ACL 2025).

Each attention head's OV circuit is read as a vocabulary-to-vocabulary map M = E · W_V · W_O · U. The sub-packages
follow the study, each using only those above it in this list:

- :mod:`.core`: errors, atomic storage, result folders, manifests, hashes, parameter ranges.
- :mod:`.heads`: per-head weights of every supported architecture (the adapter tables).
- :mod:`.models`: loading the embedded models, Hugging Face ids and local weights.
- :mod:`.relations`: the 20 relations' pairs, filtered to single tokens.
- :mod:`.static`: relation scores from the parameters alone (notebook 01).
- :mod:`.dynamic`: the heads' real outputs, against the static scores (notebook 02).
- :mod:`.ablation`: the causal experiment (notebook 03).
- :mod:`.describe`: salient operations and their descriptions (notebook 04).
- :mod:`.human`: the human study of the descriptions (notebook 05).
- :mod:`.qk`: the QK circuit (notebook 06).
- :mod:`.report`: figures, the head atlas, the paper's numbers, the run manifest.

Nothing here touches devices, seeds or the network at import time.
"""

import importlib
import warnings

from .core.errors import MapsError, ModelNotFoundError, ModelPackageMissingError, UnsupportedArchitectureError
from .core.paths import default_cache_dir
from .heads import ADAPTERS, SUPPORTED_MODEL_TYPES, HeadWeights
from .models import DEFAULT_MODEL, EMBEDDED, LoadedModel, available_models, load

__version__ = "0.2.0"

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

# the flat modules of 0.1 and where they live now: `from maps_utils import scores` still works for this release,
# with a DeprecationWarning naming the new path
MOVED = {
    "errors": "core.errors", "io": "core.io", "store": "core.store", "manifest": "core.manifest",
    "hashing": "core.hashing", "params": "core.params", "ov": "heads.ov", "hooks": "heads.hooks",
    "weights": "models.weights", "sources": "static.sources", "scan": "static.ranks", "scores": "static.scores",
    "score_tables": "static.tables", "capture": "dynamic.capture", "correlation": "dynamic.correlation",
    "fidelity": "dynamic.fidelity", "ablation_heads": "ablation.selection", "ablation_hooks": "ablation.passes",
    "ablation_result": "ablation.result", "describer": "describe.client", "endpoints": "describe.endpoints",
    "local_llm": "describe.local_llm", "response_cache": "describe.response_cache", "rules": "describe.rules",
    "predicates": "describe.predicates", "sampling": "describe.sampling", "detection": "describe.detection",
    "detection_stats": "describe.detection_stats", "executable": "describe.executable",
    "exec_study": "describe.exec_study", "human_study": "human.material", "annotations": "human.annotations",
    "annotator": "human.annotator", "agreement": "human.agreement", "qk_inference": "qk.inference",
    "qk_study": "qk.study", "plots": "report.plots", "atlas": "report.atlas", "paper": "report.paper",
}


def __getattr__(name: str):
    if name in MOVED:
        warnings.warn(f"maps_utils.{name} moved to maps_utils.{MOVED[name]}; import it from there (the old name goes "
                      "in the next release).", DeprecationWarning, stacklevel=2)
        return importlib.import_module(f".{MOVED[name]}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
