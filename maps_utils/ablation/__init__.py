"""The causal experiment (notebook 03): remove a relation's heads and watch its accuracy fall, against random heads
and control tasks.

- :mod:`.selection`: which heads go: a relation's top heads, random heads, and controls that barely overlap.
- :mod:`.passes`: a relation's task, head ablation at the last position, and accuracy curves.
- :mod:`.experiment`: :func:`causal_experiment`, cached and resumable.
- :mod:`.result`: :class:`AblationResult`: its tables, the paper's summary and layout.
"""

from .experiment import PAPER_RELATIONS, causal_experiment
from .passes import HeadAblation, Task, build_task, last_token_logits
from .result import AblationResult, paper_layout
from .selection import random_heads, relation_heads, select_controls

__all__ = ["PAPER_RELATIONS", "AblationResult", "HeadAblation", "Task", "build_task", "causal_experiment",
           "last_token_logits", "paper_layout", "random_heads", "relation_heads", "select_controls"]
