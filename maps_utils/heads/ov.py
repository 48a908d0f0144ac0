"""The OV circuit of one layer's heads, kept factored (in the spirit of TransformerLens's ``FactoredMatrix``).

For query head h of a layer, in KV group g(h), MAPS reads the vocabulary-to-vocabulary map

    M_h = E′ · W_V[g(h)] · W_O[h] · U        [V, V]; E′ the source representations, U the unembedding

which is never formed. Its rows for sources x ``[n, d_model]`` come from the factors, by one of two identities:

* head space:  ``x M_h = (x W_V[g]) · (W_O[h] U)``   inner dimension d_head (``values`` against ``columns``);
* model space: ``x M_h = ((x W_V[g]) W_O[h]) · U``   inner dimension d_model (``writes`` against U).

Norms use the Gram matrices of the factors: ``‖y W_O[h]‖² = y (W_O[h] W_O[h]ᵀ) yᵀ`` with ``y = x W_V[g]``
(norm amplification, :meth:`OVCircuit.out_gram`), and ``‖W_V[g] W_O[h]‖_F² = tr((W_Vᵀ W_V)(W_O W_Oᵀ))``
(:meth:`OVCircuit.frobenius_norms`). No biases: MAPS reads the weights alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class OVCircuit:
    """The factors of one layer's OV circuits: ``W_V`` per KV group, ``W_O`` per query head, and the group map."""

    W_V: Tensor  # [n_kv_heads, d_model, d_head]
    W_O: Tensor  # [n_heads, d_head, d_model]
    groups: Tensor  # [n_heads] the KV group of each query head

    def to(self, dtype: torch.dtype) -> OVCircuit:
        return OVCircuit(self.W_V.to(dtype), self.W_O.to(dtype), self.groups)

    def values(self, x: Tensor) -> Tensor:
        """``[n_kv_heads, n, d_head]``: ``x W_V[g]``, computed once per KV group."""
        return torch.einsum("nd,gde->gne", x, self.W_V)

    def head_values(self, x: Tensor) -> Tensor:
        """``[n_heads, n, d_head]``: each query head's ``x W_V[g(h)]``."""
        return self.values(x)[self.groups.to(x.device)]

    def writes(self, x: Tensor) -> Tensor:
        """``[n_heads, n, d_model]``: ``(x W_V[g(h)]) W_O[h]`` for every head; row s of M_h is ``writes[h, s] @ U``."""
        return torch.einsum("hne,hem->hnm", self.head_values(x), self.W_O)

    def per_head_W_V(self) -> Tensor:
        """``[n_heads, d_model, d_head]``: each query head's W_V (its KV group's; the tensor itself without GQA)."""
        return self.W_V if self.W_V.shape[0] == self.groups.numel() else self.W_V[self.groups.to(self.W_V.device)]

    def head_write(self, head: int, x: Tensor) -> Tensor:
        """``[n, d_model]``: ``(x W_V[g(head)]) W_O[head]`` for one head."""
        return (x @ self.per_head_W_V()[head]) @ self.W_O[head]

    def outputs(self, z: Tensor) -> Tensor:
        """``[.., n_heads, d_model]``: each head's write ``z_h W_O[h]`` from mixed values z ``[.., n_heads, d_head]``."""
        return torch.einsum("...hd,hdm->...hm", z, self.W_O)

    def columns(self, head: int, U: Tensor) -> Tensor:
        """``[d_head, V']``: ``W_O[head] U`` (head space; ``U`` may be a column subset or permutation)."""
        return self.W_O[head] @ U

    def out_gram(self) -> Tensor:
        """``[n_heads, d_head, d_head]``: ``W_O[h] W_O[h]ᵀ``."""
        return torch.einsum("hem,hfm->hef", self.W_O, self.W_O)

    def frobenius_norms(self) -> Tensor:
        """``[n_heads]``: ``‖W_V[g(h)] W_O[h]‖_F`` without forming the d_model × d_model product."""
        w_v = self.per_head_W_V()
        gram_v = torch.einsum("hdi,hdj->hij", w_v, w_v)  # [n_heads, d_head, d_head]
        gram_o = torch.einsum("him,hjm->hij", self.W_O, self.W_O)
        return (gram_v * gram_o).sum((-1, -2)).clamp_min(0).sqrt()
