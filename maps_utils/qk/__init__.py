"""The QK circuit (notebook 06): which source tokens each head attends to from its parameters, and whether its
real attention agrees.

- :mod:`.circuit`: :class:`QKMap`, static attention logits between query and key tokens (RoPE at fixed offsets).
- :mod:`.inference`: real attention on prompts, compared with the static logits.
- :mod:`.study`: :func:`qk_study`, the notebook's cached study (attends-and-writes, salient keys).
"""

from .circuit import QKMap, QKOptions
from .inference import real_attention
from .study import QKStudy, qk_study

__all__ = ["QKMap", "QKOptions", "QKStudy", "qk_study", "real_attention"]
