"""The streamed model (maps_utils.models.streaming): every static result equals the in-memory engine's bit for bit,
on every family's tiny configuration saved as a sharded checkpoint, and bad checkpoints are one sentence."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maps_utils
from maps_utils import relations as R
from maps_utils.core.store import RunOptions
from maps_utils.models import streaming as STR
from maps_utils.models.checkpoint import CheckpointError, convert_bin
from maps_utils.qk.circuit import QKMap
from maps_utils.static import ranks as RK
from maps_utils.static import salient as SAL
from maps_utils.static import sources as SRC
from maps_utils.static.scores import static_scores

from ..conftest import TINY_CONFIGS, make_tiny, one_sentence, relation_file, word_tokenizer

REPRESENTATIONS = SRC.names(depths=[1], modifiers=SRC.MODIFIERS)  # every base, modifier and +norm, context_free(_1)
EMBEDDED_REPRESENTATIONS = ["first_mlp", "raw+norm", "first_mlp_all+centre", "raw_mlp+nomassive+norm", "block0",
                            "context_free", "context_free_2"]


def sharded(folder: Path, key: str, dtype=torch.float32) -> Path:
    """``key``'s tiny random model saved in ``dtype`` with 20 kB shards (so tensors of one module span shards)."""
    model = make_tiny(key).to(dtype)
    model.save_pretrained(folder, max_shard_size="20KB")
    word_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


def both(folder: Path, dtype=torch.float32):
    memory = maps_utils.load(str(folder), device="cpu", dtype=dtype, stream=False)
    streamed = maps_utils.load(str(folder), device="cpu", dtype=dtype, stream=True)
    assert streamed.weights.streamed and not memory.weights.streamed
    assert streamed.info["streamed"] and not memory.info["streamed"]
    return memory.weights, streamed.weights


def pairs(vocab: int, n: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g), torch.randint(0, vocab, (n,), generator=g)


def resident(weights) -> list[str]:
    return [n for n, p in weights.model.named_parameters() if not p.is_meta]


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_streamed_ranks_equal_in_memory_for_every_representation(tmp_path, key):
    """float64 and float32 compute, every representation: the same ranks, and nothing left resident after."""
    memory, streamed = both(sharded(tmp_path, key))
    src, tgt = pairs(memory.vocab_size)
    for rep in REPRESENTATIONS:
        for dtype in (torch.float64, torch.float32):
            a = RK.target_ranks(memory, src, tgt, representation=rep, rank_cap=20, progress=False, dtype=dtype)
            b = RK.target_ranks(streamed, src, tgt, representation=rep, rank_cap=20, progress=False, dtype=dtype)
            assert torch.equal(a.top, b.top) and torch.equal(a.bottom, b.bottom), (rep, dtype)
    assert resident(streamed) == []


@pytest.mark.parametrize("key", list(TINY_CONFIGS))
def test_streamed_saliency_top_mappings_and_qk_equal_in_memory(tmp_path, key):
    dtype = torch.float32 if key.startswith("mixtral") else torch.float64  # the default MoE kernel has no float64
    memory, streamed = both(sharded(tmp_path, key, dtype), dtype)
    rep = "first_mlp_all"
    assert torch.equal(SAL.saliency(memory, representation=rep, progress=False),
                       SAL.saliency(streamed, representation=rep, progress=False))
    ids = list(range(0, memory.vocab_size, 7))
    for layer, head in ((0, 0), (memory.n_layers - 1, memory.n_heads - 1)):
        for suppression in (False, True):
            a = SAL.top_mappings(memory, layer, head, ids, 5, representation=rep, suppression=suppression, chunk=16)
            b = SAL.top_mappings(streamed, layer, head, ids, 5, representation=rep, suppression=suppression, chunk=16)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (layer, head, suppression)
    if memory.spec.alibi(memory.model):
        return  # the QK map refuses ALiBi on both paths
    qa, qb = QKMap(memory), QKMap(streamed)
    for layer in range(memory.n_layers):
        assert torch.equal(qa.scores(layer, ids, ids), qb.scores(layer, ids, ids)), layer
    assert resident(streamed) == []


def test_streaming_reads_tensors_memory_mapped_and_in_their_stored_dtype(tmp_path):
    """A bfloat16 checkpoint scored in float32: U's columns and E's rows come from the bf16 tensors as stored
    (nothing converted whole), and the ranks equal those of the in-memory model converted by from_pretrained."""
    folder = sharded(tmp_path, "llama-mha-untied", torch.bfloat16)
    memory, streamed = both(folder)
    assert streamed.unembed_stored.dtype == torch.bfloat16 and streamed.dtype == torch.float32
    assert memory.unembed_stored.dtype == torch.float32
    assert torch.equal(memory.U, streamed.U) and torch.equal(memory.E, streamed.E)
    src, tgt = pairs(memory.vocab_size)
    for rep in ("raw", "first_mlp", "context_free"):
        a = RK.target_ranks(memory, src, tgt, representation=rep, progress=False)
        b = RK.target_ranks(streamed, src, tgt, representation=rep, progress=False)
        assert torch.equal(a.top, b.top) and torch.equal(a.bottom, b.bottom), rep


def test_an_unsharded_checkpoint_streams_too(tmp_path):
    """One model.safetensors and no index (as the embedded models' converted cache is)."""
    make_tiny("qwen2-gqa").to(torch.float32).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    memory, streamed = both(tmp_path)
    src, tgt = pairs(memory.vocab_size)
    a = RK.target_ranks(memory, src, tgt, representation="context_free", progress=False)
    b = RK.target_ranks(streamed, src, tgt, representation="context_free", progress=False)
    assert torch.equal(a.top, b.top) and torch.equal(a.bottom, b.bottom)


def test_static_scores_of_a_streamed_model_equal_the_in_memory_table(tmp_path):
    folder = sharded(tmp_path / "ckpt", "llama-gqa")
    rels = [R.load(relation_file(tmp_path, f"rel{i}", shift=i + 1)) for i in range(2)]
    run = RunOptions(results_dir=None, progress=False)
    tables = [static_scores(maps_utils.load(str(folder), device="cpu", stream=s), rels, min_pairs=10, run=run).table()
              for s in (False, True)]
    assert tables[0].equals(tables[1])


# ---- choosing the path ----------------------------------------------------------------------------------------
def test_stream_is_chosen_when_the_checkpoint_exceeds_free_memory(tmp_path, monkeypatch, caplog):
    folder = sharded(tmp_path, "llama-gqa")
    monkeypatch.setattr(STR, "free_memory", lambda device: 10**12)
    assert not maps_utils.load(str(folder), device="cpu").weights.streamed
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    monkeypatch.setattr(STR, "free_memory", lambda device: size // 2 if device is not None else 0)
    with caplog.at_level(logging.WARNING):
        loaded = maps_utils.load(str(folder), device="cpu")
    assert loaded.weights.streamed
    said = [r.getMessage() for r in caplog.records if "streaming" in r.getMessage()]
    assert len(said) == 1 and "GB free" in said[0] and "\n" not in said[0]


def test_a_checkpoint_too_big_for_the_device_says_how_much_it_needs(tmp_path, monkeypatch):
    folder = sharded(tmp_path, "llama-gqa")
    monkeypatch.setattr(STR, "free_memory", lambda device: 1000)
    with pytest.raises(CheckpointError) as err:
        maps_utils.load(str(folder), device="cpu", stream=True)
    one_sentence(f"error: {err.value}")
    assert "needs about" in str(err.value) and "GB on cpu" in str(err.value)


# ---- bad checkpoints: one sentence each -----------------------------------------------------------------------
def _error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        maps_utils.load(str(folder), device="cpu", stream=True)
    one_sentence(f"error: {err.value}")
    return str(err.value)


def test_a_missing_shard_is_one_sentence(tmp_path):
    folder = sharded(tmp_path, "llama-gqa")
    shard = sorted(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())[2]
    (folder / shard).unlink()
    assert shard in _error(folder) and "download" in _error(folder)


def test_a_truncated_shard_is_one_sentence(tmp_path):
    folder = sharded(tmp_path, "llama-gqa")
    shard = max(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert shard.name in _error(folder) and "cut off" in _error(folder)


def test_a_bin_checkpoint_names_the_conversion_which_then_streams(tmp_path):
    source = sharded(tmp_path / "st", "llama-gqa")
    folder = tmp_path / "bin"
    folder.mkdir()
    state = {k: v for k, v in make_tiny("llama-gqa").to(torch.float32).state_dict().items()}
    torch.save(dict(list(state.items())[:10]), folder / "pytorch_model-00001-of-00002.bin")
    torch.save(dict(list(state.items())[10:]), folder / "pytorch_model-00002-of-00002.bin")
    for f in source.iterdir():
        if f.suffix == ".json" and "index" not in f.name:
            (folder / f.name).write_bytes(f.read_bytes())
    assert f"maps convert {folder}" in _error(folder)
    proc = subprocess.run([sys.executable, "-m", "maps_utils.cli", "convert", str(folder)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    converted = tmp_path / "bin-safetensors"
    memory, streamed = both(source)[0], maps_utils.load(str(converted), device="cpu", stream=True).weights
    src, tgt = pairs(memory.vocab_size)
    a = RK.target_ranks(memory, src, tgt, representation="first_mlp", progress=False)
    b = RK.target_ranks(streamed, src, tgt, representation="first_mlp", progress=False)
    assert torch.equal(a.top, b.top) and torch.equal(a.bottom, b.bottom)


def test_convert_bin_refuses_a_folder_without_bin_files(tmp_path):
    with pytest.raises(CheckpointError):
        convert_bin(tmp_path)


def test_the_cli_says_a_bad_checkpoint_in_one_line(tmp_path):
    folder = sharded(tmp_path, "llama-gqa")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    proc = subprocess.run([sys.executable, "-m", "maps_utils.cli", "score", str(folder), "--stream",
                           "--results-dir", str(tmp_path / "results")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: Checkpoint") and "Traceback" not in proc.stderr


# ---- the embedded models: their converted safetensors cache, streamed ---------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_streamed_embedded_models_rank_like_the_in_memory_ones(request, model_cache, name):
    """Every base, modifier and +norm at least once (on Gemma-3, with its 262k vocabulary: its registered
    context_free, raw and the paper's first_mlp), every layer, float32: the ranks of 40 pairs of a shipped relation
    (the paper's country_capital) equal the in-memory engine's; the streamed model keeps nothing resident."""
    memory = request.getfixturevalue("smollm2" if name.startswith("smollm2") else "gemma3")
    streamed = maps_utils.load(name, device="cpu", cache_dir=model_cache, stream=True)
    assert streamed.weights.streamed and not memory.weights.streamed
    assert streamed.weights_sha256 == memory.weights_sha256  # the GGUF's hash: both paths share cached results
    rel = R.filter_single_token(R.load("country_capital"), memory.tokenizer)
    src, tgt = rel.source_ids[:40], rel.target_ids[:40]
    reps = EMBEDDED_REPRESENTATIONS if name.startswith("smollm2") else ["context_free", "raw", "first_mlp"]
    for rep in reps:
        a = RK.target_ranks(memory.weights, src, tgt, representation=rep, progress=False)
        b = RK.target_ranks(streamed.weights, src, tgt, representation=rep, progress=False)
        assert torch.equal(a.top, b.top) and torch.equal(a.bottom, b.bottom), rep
    assert resident(streamed.weights) == []


def test_the_random_weight_control_refuses_a_streamed_model(tmp_path):
    """Notebook 04's control edits W_V and W_O in place, which a streamed model would silently undo."""
    from maps_utils.core.errors import OptionError
    from maps_utils.describe.exec_study import random_head_ops

    loaded = maps_utils.load(str(sharded(tmp_path, "llama-gqa")), device="cpu", stream=True)
    with pytest.raises(OptionError) as err:
        random_head_ops(loaded, [(1, 0)])
    one_sentence(f"error: {err.value}")
    assert "stream=False" in str(err.value)
