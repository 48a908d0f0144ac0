"""The static engine on a GPU gives the CPU's ranks exactly (float64), for every family and a parameter-only and a
forward-pass representation. Runs only where CUDA is present (a GPU machine; CI has none, and says so)."""

from __future__ import annotations

import pytest
import torch

from maps_utils import HeadWeights
from maps_utils.static import ranks as S

from ..conftest import TINY_CONFIGS, make_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
@pytest.mark.parametrize("compute_space", ["head", "model"])
def test_gpu_ranks_equal_cpu_ranks(key, compute_space):
    model = make_tiny(key)
    model.config.bos_token_id = 3
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    src, tgt = torch.randint(0, vocab, (40,), generator=g), torch.randint(0, vocab, (40,), generator=g)
    for representation in ("first_mlp", "raw_mlp+centre+norm", "context_free"):
        cpu = S.target_ranks(HeadWeights(model), src, tgt, representation=representation, rank_cap=vocab,
                             compute_space=compute_space, progress=False)
        gpu = S.target_ranks(HeadWeights(model.to("cuda")), src, tgt, representation=representation, rank_cap=vocab,
                             compute_space=compute_space, progress=False)
        model.to("cpu")
        assert torch.equal(cpu.top, gpu.top) and torch.equal(cpu.bottom, gpu.bottom), representation
