"""Salient operations described (notebook 04): by an LLM (GPT-4o or a local model), by rules and by executable
predicates, and checked on held-out rows.

- :mod:`.sampling`: which heads to describe: a seeded sample stratified by layer quartile.
- :mod:`.pipeline`: salient operations -> prompt -> describer -> parsed, cached descriptions.
- :mod:`.client`: :class:`Describer`, the LLM client: response cache, retries, stop rules.
- :mod:`.endpoints`, :mod:`.local_llm`, :mod:`.response_cache`: where the LLM runs, and what it answered before.
- :mod:`.rules`, :mod:`.predicates`, :mod:`.executable`, :mod:`.exec_study`: descriptions that can be run.
- :mod:`.detection`, :mod:`.detection_stats`: does a description pick out the head's own held-out operations?
"""

from .client import Describer
from .detection import score_descriptions
from .endpoints import llm_endpoint, resolve_endpoint
from .exec_study import describe_executable
from .executable import ExecOptions
from .pipeline import build_prompt, describe, describe_heads, parse_description, salient_ops
from .sampling import select_heads

__all__ = ["Describer", "ExecOptions", "build_prompt", "describe", "describe_executable", "describe_heads",
           "llm_endpoint", "parse_description", "resolve_endpoint", "salient_ops", "score_descriptions",
           "select_heads"]
