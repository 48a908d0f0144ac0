"""Shared fixtures: seeding, tiny random models of every family, embedded models, and the exactness checks."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from maps_utils import load

# Tiny random configs, one per supported family (plus GQA / sequential variants).
TINY_CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64)),
    "gpt_neox-parallel": (
        "GPTNeoXConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=101,
             rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=64),
    ),
    "gpt_neox-sequential": (
        "GPTNeoXConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=101,
             rotary_pct=0.25, use_parallel_residual=False, max_position_embeddings=64),
    ),
    "phi-gqa": (
        "PhiConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=101, partial_rotary_factor=0.5, max_position_embeddings=64),
    ),
    "llama-gqa": (
        "LlamaConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=101, max_position_embeddings=64),
    ),
    "llama-mha-untied": (
        "LlamaConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=96, vocab_size=101, max_position_embeddings=64, tie_word_embeddings=False),
    ),
    "gemma3-gqa": (
        "Gemma3TextConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             intermediate_size=96, vocab_size=101, max_position_embeddings=64, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    "gemma3-mqa": (
        "Gemma3TextConfig",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
             intermediate_size=96, vocab_size=101, max_position_embeddings=64, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"]),
    ),
    "qwen2-gqa": (
        "Qwen2Config",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=101, max_position_embeddings=64),
    ),
}
_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=101,
             max_position_embeddings=64, pad_token_id=None)
_GQA = dict(_BASE, num_key_value_heads=2)
TINY_CONFIGS |= {  # the families added by issue 20 (transformers' own config classes, tiny sizes)
    "qwen3-gqa": ("Qwen3Config", dict(_GQA, head_dim=16)),
    "mistral-gqa": ("MistralConfig", _GQA),
    "mixtral-gqa": ("MixtralConfig", dict(_GQA, num_local_experts=4, num_experts_per_tok=2)),
    "gemma-gqa": ("GemmaConfig", dict(_GQA, head_dim=16)),
    "gemma2-gqa": ("Gemma2Config", dict(_GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=8)),
    "phi3-gqa": ("Phi3Config", _GQA),
    "olmo2-gqa": ("Olmo2Config", _GQA),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, n_inner=96, rotary_dim=8, vocab_size=101,
                                n_positions=64)),
    "falcon-mqa": ("FalconConfig", dict(_BASE, ffn_hidden_size=96)),
    "falcon-gqa": ("FalconConfig", dict(_BASE, ffn_hidden_size=96, new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-mha-sequential": ("FalconConfig", dict(_BASE, ffn_hidden_size=96, multi_query=False, parallel_attn=False,
                                                   bias=True)),
    "stablelm-gqa": ("StableLmConfig", _GQA),
    "stablelm-parallel": ("StableLmConfig", dict(_BASE, num_key_value_heads=4, use_parallel_residual=True,
                                                 use_qkv_bias=True)),
    "granite-gqa": ("GraniteConfig", dict(_GQA, embedding_multiplier=12.0, residual_multiplier=0.22,
                                          logits_scaling=8.0, attention_multiplier=0.125)),
    "cohere-gqa": ("CohereConfig", _GQA),
}

FAMILY_OF = {key: key.split("-")[0] for key in TINY_CONFIGS}  # the family is the key before its variant


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def make_tiny(key: str) -> torch.nn.Module:
    """A tiny random causal LM of the given variant, with *every* parameter (biases and norms too) random."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[key]
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    moe = {"experts_implementation": "eager"} if cls_name == "MixtralConfig" else {}  # grouped_mm has no float64
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="eager",
                                                          **moe)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval().requires_grad_(False)
    return model


def word_tokenizer():
    """A word-level tokenizer for the tiny models: "t0" … "t99" are ids 0–99, anything else "[UNK]" (100)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(100)} | {"[UNK]": 100}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(params=list(TINY_CONFIGS))
def tiny(request):
    return request.param, make_tiny(request.param)


# ---- embedded models: one cold conversion per session, into a private cache --------------------
@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("maps-cache")
    os.environ["MAPS_CACHE_DIR"] = str(path)  # notebooks run by tests share it
    return path


@pytest.fixture(scope="session")
def smollm2_cold(model_cache):
    t0 = time.perf_counter()
    loaded = load("smollm2-135m", device="cpu", cache_dir=model_cache)
    return loaded, time.perf_counter() - t0


@pytest.fixture(scope="session")
def smollm2(smollm2_cold):
    return smollm2_cold[0]


@pytest.fixture(scope="session")
def gemma3(model_cache):
    return load("gemma3-270m", device="cpu", cache_dir=model_cache)


# ---- the reliability tests' tiny checkpoints, relation files, one-sentence check and isolated cache ----
def tiny_checkpoint(folder: Path, scale: float = 1.0) -> Path:
    """A tiny random Llama checkpoint (with a word tokenizer) saved by save_pretrained; ``scale`` changes W_O."""
    model = make_tiny("llama-gqa").to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(scale)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def relation_file(folder: Path, name: str, shift: int, n: int = 40) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps([[f"t{i}", f"t{(i * 7 + shift) % 100}"] for i in range(n)]))
    return path


def one_sentence(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"
