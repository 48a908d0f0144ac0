"""The static engine (notebook 01): every head's relation and suppression scores, read from its parameters alone.

Data flows down this list: a relation's pairs -> their source vectors -> target ranks -> scores -> tables.

- :mod:`.sources`: source representations, the vector x_s each head's map M = x_s·W_V·W_O·U reads.
- :mod:`.ranks`: target ranks of a relation's pairs in every head (:func:`target_ranks`), exact below a cap, by an
  early-stopping scan of the vocabulary.
- :mod:`.scores`: :func:`static_scores`, cached per relation and resumable, as a tidy table.
- :mod:`.tables`: the analyses of a score table (category map, top heads, KV-group similarity).
- :mod:`.salient`: salient operations (norm amplification, top mappings) for notebook 04.
"""

from .ranks import (
    Columns,
    RankResult,
    head_ranks,
    head_rows,
    layer_ranks,
    ranks_of_targets,
    scan_columns,
    scan_permutation,
    target_ranks,
)
from .salient import saliency, salient_operations, top_mappings
from .scores import RANK_CAP, TAU, StaticScores, choose_representation, static_scores
from .scores import (
    choose_variant as choose_variant,  # renamed choose_representation; goes in the next release
)
from .tables import category_map, kv_group_similarity, top_heads

__all__ = ["RANK_CAP", "TAU", "Columns", "RankResult", "StaticScores", "category_map",
           "choose_representation", "head_ranks", "head_rows", "kv_group_similarity", "layer_ranks", "ranks_of_targets",
           "saliency", "salient_operations", "scan_columns", "scan_permutation", "static_scores", "target_ranks",
           "top_heads", "top_mappings"]
