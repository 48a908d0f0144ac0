"""Static against dynamic (notebook 02): what the heads really write during inference, and how well static scores
predict it.

- :mod:`.capture`: prompts from a relation's template, and every head's write at the last position.
- :mod:`.scores`: dynamic relation scores, with and without context (:func:`dynamic_scores`), and multi-token ones.
- :mod:`.correlation`: Pearson r between static and dynamic scores per relation, and the paper's summary.
- :mod:`.fidelity`: how closely each source representation resembles what the heads read at inference.
"""

from .capture import Prompt, build_prompts, tokenization_agreement
from .correlation import correlation_summary, correlations, pearson
from .correlation import summary as summary  # renamed correlation_summary; goes in the next release
from .fidelity import fidelity_profile
from .scores import CONTEXTS, DynamicRelation, DynamicScores, dynamic_scores, multi_token_scores

__all__ = ["CONTEXTS", "DynamicRelation", "DynamicScores", "Prompt", "build_prompts", "correlation_summary",
           "correlations", "dynamic_scores", "fidelity_profile", "multi_token_scores", "pearson", "tokenization_agreement"]
