"""Scaling series: static scores of every head on randomly initialised models of the paper's shapes.

Each shape is a transformers config with the real sizes (layers, heads, d_model, vocabulary, MLP width) and
random weights (seeded). Random weights cost the same as trained ones except where ranks depend on the data;
the engine's early exit (MAPS-SPEC §1.4 ranks are exact below the cap) can end sooner on trained weights.

Per shape, in a fresh process:
  engine  maps_utils.static.ranks.target_ranks (relation and suppression ranks) for every head, on --relations sets of
          --pairs random (source, target) pairs, representation first_mlp (the paper's), float32
  naive   the reference way (per head W_VO = W_V W_O, the full n x V projection, topk), timed on
          --naive-layers layers and scaled to all layers
  floor   the factored FLOPs (z = x W_V, C_h = W_O U, z C_h over the full vocabulary) over the measured matmul
          throughput of this device
When the full model does not fit (--max-gib of float32 weights), it is built with fewer layers and every time is
scaled linearly to the full depth (each layer's work is the same); memory is reported as measured, with the full
model's float32 weight size beside it.

  python bench/bench_scale.py --device cpu            # this machine: shapes truncated to fit 24 GiB
  python bench/bench_scale.py --device cuda           # a GPU: full depth where it fits
Writes results/bench/scale-<device>.csv and a manifest, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (config class, sizes); the paper's three models and the two embedded ones
SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                         tie_word_embeddings=True)),
    "gemma3-270m": ("Gemma3TextConfig", dict(hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                                             num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                                             vocab_size=262144)),
    "gpt2-xl": ("GPT2Config", dict(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024)),
    "pythia-6.9b": ("GPTNeoXConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                          intermediate_size=16384, vocab_size=50432, rotary_pct=0.25,
                                          use_parallel_residual=True, tie_word_embeddings=False)),
    "llama-3.1-8b": ("LlamaConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                         tie_word_embeddings=False)),
}


def _config(name: str, layers: int | None = None):
    import transformers

    cls, sizes = SHAPES[name]
    config = getattr(transformers, cls)(**sizes)
    if layers is not None:
        key = "n_layer" if cls == "GPT2Config" else "num_hidden_layers"
        setattr(config, key, layers)
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:layers]
    return config


def full_layers(name: str) -> int:
    config = _config(name)
    return config.num_hidden_layers


def weight_gib(name: str, layers: int | None = None) -> float:
    """float32 size of the model's weights, counted on the meta device (nothing is allocated)."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_config(name, layers))
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values()) * 4 / 2**30


def build(name: str, layers: int, device: str, seed: int = 0):
    import transformers

    config = _config(name, layers)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def _pairs(vocab: int, relations: int, pairs: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (pairs,), generator=g), torch.randint(0, vocab, (pairs,), generator=g))
            for _ in range(relations)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def measure(name: str, layers: int, device: str, relations: int, pairs: int, naive_layers: int) -> dict:
    """One shape in this process: engine and naive seconds for the built layers, peak memory, factored FLOPs."""
    from maps_utils import HeadWeights
    from maps_utils.static import ranks as S
    from maps_utils.static.sources import source_vectors

    t0 = time.perf_counter()
    weights = HeadWeights(build(name, layers, device))
    build_s = time.perf_counter() - t0
    sets = _pairs(weights.vocab_size, relations, pairs, seed=1)
    S.target_ranks(weights, sets[0][0][:4], sets[0][1][:4], layers=[0], progress=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for src, tgt in sets:
        S.target_ranks(weights, src, tgt, representation="first_mlp", rank_cap=100, progress=False)
    _sync(device)
    engine_s = time.perf_counter() - t0
    peak = _peak_gib(device)
    todo = sorted({round(i * (layers - 1) / max(1, naive_layers - 1)) for i in range(min(naive_layers, layers))})
    t0 = time.perf_counter()
    with torch.no_grad():
        for layer in todo:
            for src, tgt in sets:
                x = source_vectors(weights, src, "first_mlp", layer)
                for head in range(weights.n_heads):
                    full = (x @ (weights.W_V(layer)[head] @ weights.W_O(layer)[head])) @ weights.U
                    t = tgt.to(full.device)[:, None]
                    (torch.topk(full, 10, dim=1).indices == t).any(1).float().mean().item()
                    (torch.topk(-full, 10, dim=1).indices == t).any(1).float().mean().item()
    _sync(device)
    naive_s = (time.perf_counter() - t0) * layers / len(todo)
    h, n = weights, relations * pairs
    flops = layers * (h.n_kv_heads * 2 * n * h.d_model * h.d_head
                      + h.n_heads * 2 * h.d_head * h.vocab_size * (h.d_model + n))
    return {"build_s": build_s, "engine_s": engine_s, "naive_s": naive_s, "naive_layers": len(todo),
            "factored_gflop": flops / 1e9, "peak_gib": peak, "heads_per_layer": h.n_heads,
            "vocab": h.vocab_size, "d_model": h.d_model}


def matmul_gflops(device: str, n: int = 4096) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    _sync(device)
    return 5 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--relations", type=int, default=3, help="random relations (pair sets) per shape")
    parser.add_argument("--pairs", type=int, default=40, help="pairs per relation")
    parser.add_argument("--naive-layers", type=int, default=2)
    parser.add_argument("--max-gib", type=float, default=None,
                        help="largest float32 model built (default: 8 GiB on cpu, 100 GiB on cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--step", nargs=2, metavar=("SHAPE", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step:
        name, layers = args.step[0], int(args.step[1])
        print(json.dumps(measure(name, layers, args.device, args.relations, args.pairs, args.naive_layers)))
        return

    from maps_utils.core.manifest import build_manifest, write_manifest

    t_all = time.perf_counter()
    max_gib = args.max_gib or (100.0 if args.device.startswith("cuda") else 8.0)
    gflops = matmul_gflops(args.device)
    print(f"float32 matmul on {args.device}: {gflops:.0f} GFLOP/s", flush=True)
    rows = []
    for name in args.shapes:
        total, gib = full_layers(name), weight_gib(name)
        layers = total
        while layers > 1 and weight_gib(name, layers) > max_gib:
            layers = max(1, layers // 2)
        common = ["--device", args.device, "--relations", str(args.relations), "--pairs", str(args.pairs),
                  "--naive-layers", str(args.naive_layers)] + (["--threads", str(args.threads)] if args.threads else [])
        got = _subprocess([*common, "--step", name, str(layers)])
        row = {"shape": name, "layers": total, "layers_built": layers, "weights_gib_full": round(gib, 2), **got}
        if "error" not in got:
            scale = total / layers
            floor = got["factored_gflop"] / gflops
            row.update(engine_s_full=got["engine_s"] * scale, naive_s_full=got["naive_s"] * scale,
                       floor_s_full=floor * scale, engine_vs_naive=got["naive_s"] / got["engine_s"],
                       engine_vs_floor=got["engine_s"] / floor)
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows).round(3)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scale-{args.device.split(':')[0]}"
    table.to_csv(out / f"{stem}.csv", index=False)
    write_manifest(out / f"{stem}.manifest.json", build_manifest(
        parameters={**vars(args), "matmul_gflops": round(gflops, 1), "max_gib": max_gib},
        wall_seconds=time.perf_counter() - t_all))
    cols = ["shape", "layers", "layers_built", "weights_gib_full", "engine_s_full", "naive_s_full", "floor_s_full",
            "engine_vs_naive", "engine_vs_floor", "peak_gib"]
    print(table[[c for c in cols if c in table]].to_string(index=False))


if __name__ == "__main__":
    main()
