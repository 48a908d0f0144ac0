"""One forward pass per prompt set: the dynamic scores' pass also reads the fidelity profile's real sources and the
QK study's attention rows, bit for bit what those steps' own passes give, and the later steps read them from the
store instead of running the model (issue 38)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from maps_utils.core.store import RunOptions
from maps_utils.dynamic import fidelity as FI
from maps_utils.dynamic import scores as DY
from maps_utils.heads import HeadWeights
from maps_utils.models.loading import LoadedModel
from maps_utils.qk import inference as QI
from maps_utils.qk import study as QS
from maps_utils.static import scores as SC

from ..conftest import TINY_CONFIGS, make_tiny, word_tokenizer

CA = importlib.import_module("maps_utils.dynamic.capture")


def _prompts(vocab: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (5, 9, 3, 7, 9, 1, 6):
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(CA.Prompt(tuple(ids), int(torch.randint(0, n, (1,), generator=g))))
    return out


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_one_pass_reads_what_each_steps_own_pass_reads(key):
    """Every family: z and v as :func:`capture` gives them, the source inputs as the fidelity profile's pass, the
    attention rows as the QK study's pass: the same bits."""
    model = make_tiny(key)
    weights = HeadWeights(model)
    ids, last, source = CA.pad_batch(_prompts(model.config.vocab_size), 0, "cpu")
    got = CA.capture_readouts(model, weights, ids, last, source, readouts=CA.READOUTS)
    z, v = CA.capture(model, weights, ids, last, source)
    assert torch.equal(got["z_last"], z) and torch.equal(got["v_source"], v)
    assert torch.equal(got["source_inputs"], FI.real_sources(model, weights, ids, source))
    assert torch.equal(got["attention"], QI.real_attention(model, weights, ids, last))
    with pytest.raises(ValueError, match="unknown readouts"):
        CA.capture_readouts(model, weights, ids, last, source, readouts=("logits",))


def _tiny_loaded(key: str) -> LoadedModel:
    model = make_tiny(key).to(torch.float32)
    return LoadedModel(f"tiny-{key}", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"),
                       torch.float32, "test", 0.0)


def _relations(folder) -> list:
    paths = []
    for name, shift in (("shifted", 3), ("scaled", 11)):
        path = folder / f"{name}.json"
        path.write_text(json.dumps([[f"t{i}", f"t{(i * 7 + shift) % 100}"] for i in range(40)]))
        paths.append(path)
    return paths


def _study(loaded, rels, templates, run, readouts: bool, qk: bool = True):
    """The dynamic scores, the fidelity profile and (``qk``: it reads shipped relations only) the QK study."""
    dyn = DY.dynamic_scores(loaded, rels, templates, run=run, readouts=readouts)
    fid = FI.fidelity_profile(loaded, ["first_mlp", "raw+norm", "context_free_1"], rels, templates, run=run)
    if not qk:
        return dyn.table(), fid
    study = QS.qk_study(loaded, dyn, SC.static_scores(loaded, rels, run=run), run=run)
    return dyn.table(), fid, study.validation, study.joint, study.correlations


class _Counter:
    def __init__(self, monkeypatch, module, name):
        self.calls, real = 0, getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)


@pytest.mark.parametrize("key", ["llama-gqa", "gpt2", "gemma3-gqa"])
def test_later_steps_read_the_stored_pass_and_give_the_same_tables(key, tmp_path, monkeypatch):
    loaded, rels, templates = _tiny_loaded(key), _relations(tmp_path), ["t1 <X> t2", "<X> t5"]
    own = _study(loaded, rels, templates, RunOptions(results_dir=tmp_path / "own", progress=False, batch_size=16),
                 readouts=False, qk=False)
    assert not (tmp_path / "own" / loaded.name / "dynamic" / "readouts").exists()
    sources = _Counter(monkeypatch, FI, "real_sources")
    run = RunOptions(results_dir=tmp_path / "shared", progress=False, batch_size=16)
    shared = _study(loaded, rels, templates, run, readouts=True, qk=False)
    assert sources.calls == 0  # the fidelity profile ran no pass of its own
    for a, b in zip(own, shared, strict=True):
        assert a.equals(b)
    assert sorted(p.stem for p in (tmp_path / "shared" / loaded.name / "dynamic" / "readouts").glob("*.pt")) == \
        ["scaled", "shifted"]


def test_another_batch_size_runs_its_own_pass(tmp_path, monkeypatch):
    """The readouts are a batch's bits: a step that batches the prompts otherwise does not read them."""
    loaded, rels, templates = _tiny_loaded("llama-gqa"), _relations(tmp_path), ["t1 <X> t2"]
    DY.dynamic_scores(loaded, rels, templates, run=RunOptions(results_dir=tmp_path, progress=False, batch_size=16))
    sources = _Counter(monkeypatch, FI, "real_sources")
    FI.fidelity_profile(loaded, ["raw"], rels, templates,
                        run=RunOptions(results_dir=tmp_path, progress=False, batch_size=8))
    assert sources.calls == 2 * 5  # two relations, 40 prompts in batches of 8


def test_embedded_model_reads_its_stored_pass(smollm2, tmp_path, monkeypatch):
    """SmolLM2-135M: the fidelity profile and the QK study from the stored pass equal those from their own passes."""
    rels, templates = ["country_capital"], ["No <X> means no"]
    own = _study(smollm2, rels, templates, RunOptions(results_dir=tmp_path / "own", progress=False), readouts=False)
    sources, attention = _Counter(monkeypatch, FI, "real_sources"), _Counter(monkeypatch, QI, "real_attention")
    shared = _study(smollm2, rels, templates, RunOptions(results_dir=tmp_path / "shared", progress=False),
                    readouts=True)
    assert sources.calls == 0  # the fidelity profile ran no pass of its own
    n = shared[0].n_prompts.iloc[0]
    assert attention.calls == -(-n // 64)  # the QK study ran only its distractor prompts' (one set, batches of 64)
    for a, b in zip(own, shared, strict=True):
        assert a.equals(b)
