"""One forward pass per prompt set: what the dynamic scores' pass reads for the steps that run the same prompts again.

The dynamic scores (notebook 02) run every relation's prompts once. The same pass also reads the real source vectors
of the fidelity profile (:mod:`maps_utils.dynamic.fidelity`) and the attention rows of the static QK map's study
(:mod:`maps_utils.qk.study`, notebook 06), see :data:`~maps_utils.dynamic.capture.READOUTS`. They are stored per
relation under ``<results_dir>/<model>/dynamic/readouts/``, keyed by the weights' hash, the dtype, every prompt's ids,
the batch size and the pad id. A later step that builds the same prompts in the same batches reads them instead of
running the model; anything else (another batch size, a relation the dynamic run read from an older store) runs
its own pass, as before. A batch's float32 activations depend on the other prompts in it, so the batches must
match for the readouts to be the bits that step's own pass would give.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..core.hashing import content_key
from ..core.store import RunOptions, Slots
from .capture import READOUTS, Prompt

VERSION = 1


@dataclass
class PromptSetReadouts:
    """One relation's readouts: per template, per batch of ``batch_size`` prompts, the tensors of
    :data:`~maps_utils.dynamic.capture.READOUTS` (``source_inputs[t][b]`` ``[B, L, d_model]``; ``attention[t][b]``
    ``[B, L, H, T_b]`` or None where the model returns no attention weights)."""

    batch_size: int
    source_inputs: list[list[Tensor]]
    attention: list[list[Tensor | None]]

    def has_attention(self) -> bool:
        return all(a is not None for per in self.attention for a in per)


class ReadoutStore:
    """The readouts of a model's prompt sets in its results folder (no folder: nothing is kept, every read misses)."""

    def __init__(self, loaded, run: RunOptions):
        self.identity = {"version": VERSION, "model": loaded.name, "weights_sha256": loaded.weights_sha256,
                         "dtype": str(loaded.dtype), "architecture": loaded.weights.summary()}
        folder = run.folder(loaded.name, "dynamic", "readouts")
        self.slots = Slots(folder, enabled=run.use_cache)

    def key(self, per_template: Sequence[Sequence[Prompt]], batch_size: int, pad: int) -> str:
        return content_key({**self.identity, "batch_size": batch_size, "pad": pad, "readouts": list(READOUTS),
                            "prompts": [[[p.ids, p.source] for p in ps] for ps in per_template]})

    def read(self, relation: str, per_template: Sequence[Sequence[Prompt]], batch_size: int,
             pad: int) -> PromptSetReadouts | None:
        """The relation's readouts when they were taken from exactly these prompts, batches and weights."""
        value = self.slots.read(relation, self.key(per_template, batch_size, pad))
        if not isinstance(value, dict):
            return None
        return PromptSetReadouts(batch_size, value["source_inputs"], value["attention"])

    def write(self, relation: str, per_template: Sequence[Sequence[Prompt]], pad: int,
              readouts: PromptSetReadouts) -> None:
        self.slots.write(relation, self.key(per_template, readouts.batch_size, pad),
                         {"source_inputs": readouts.source_inputs, "attention": readouts.attention})
