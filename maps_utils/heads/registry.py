"""The adapter table: which :class:`~.spec.ArchSpec` reads which ``config.model_type``, and the generic path for
decoder-only models the table does not list."""

from __future__ import annotations

from torch import nn

from ..core.errors import UnsupportedArchitectureError
from . import classic, gemma, llama
from .spec import ArchSpec, llama_like

ADAPTERS: tuple[ArchSpec, ...] = (*classic.FAMILIES, *llama.FAMILIES, *gemma.FAMILIES)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for spec in ADAPTERS for t in spec.model_types)
GENERIC = "generic"


def spec_for(model: nn.Module) -> ArchSpec:
    """The adapter for ``model`` (by ``config.model_type``); for an unlisted decoder-only model with separate
    q/k/v/o projections, the generic adapter (which :class:`~.head_weights.HeadWeights` checks against the model
    before reading it); else one sentence naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ADAPTERS:
        if model_type in spec.model_types:
            return spec
    spec = generic_spec(model)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported; MAPS adapters exist for "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}, and its modules do not follow the Llama-like layout the generic "
            "adapter reads (add an ArchSpec in maps_utils/heads/ for it).")
    return spec


def _linear(module: nn.Module | None, *names: str) -> bool:
    return module is not None and all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def generic_spec(model: nn.Module) -> ArchSpec | None:
    """A Llama-like adapter for ``model`` where its modules fit that layout (``model.model.layers``, each with
    ``self_attn.{q,k,v,o}_proj`` and ``input_layernorm``; the MLP after ``post_attention_layernorm``, or in parallel
    on the input norm where the block has none), else None. Not yet checked against the model."""
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if config is None or not layers or not all(hasattr(config, a) for a in
                                                ("num_attention_heads", "hidden_size", "num_hidden_layers")):
        return None
    block = layers[0]
    if not (_linear(getattr(block, "self_attn", None), "q_proj", "k_proj", "v_proj", "o_proj")
            and isinstance(getattr(block, "input_layernorm", None), nn.Module) and hasattr(block, "mlp")):
        return None
    # an unlisted model may pass K/V or other state between its layers: its blocks are always run
    if isinstance(getattr(block, "post_attention_layernorm", None), nn.Module):
        return llama_like(GENERIC, (config.model_type,), replayable_blocks=False)
    return llama_like(GENERIC, (config.model_type,), parallel_attn_mlp=True, replayable_blocks=False,
                      mlp0=lambda b, x: b.mlp(b.input_layernorm(x)))
