"""What a reader sees: figures, the self-contained head atlas, the paper's numbers beside ours, the run manifest.

- :mod:`.plots`: every figure of the notebooks, saved atomically.
- :mod:`.atlas`: the HTML head atlas of a model, built from its results.
- :mod:`.paper`: the paper's published numbers and side-by-side comparisons.
- :mod:`.run_manifest`: ``make all``'s record of each executed notebook.
"""

from .atlas import build_atlas
from .plots import save_figure
from .run_manifest import record_step

__all__ = ["build_atlas", "record_step", "save_figure"]
