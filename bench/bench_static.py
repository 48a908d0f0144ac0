"""Static-score benchmark: the engine vs the naive per-head loop, on every head × every usable relation.

For each model, in one run:
  engine   maps_utils.scores.static_scores (relation + suppression ranks for all heads, one pass)
  naive    the reference code's way: per head, W_VO = W_V W_O (d×d), per relation the full
           (n × V) projection and torch.topk for the relation and the suppression score.
           Its per-layer cost is the same for every layer, so by default it is timed on
           --naive-layers layers and scaled to all layers (pass --naive-layers all to time every one).
  floor    the factored FLOPs (z = x·W_V, C_h = W_O·U, z·C_h over the full vocabulary) divided by this
           machine's measured float32 matmul throughput.
Peak memory is the process's peak resident set size, measured in a fresh subprocess per measurement.
Writes results/bench/static.csv and a manifest.
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


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _usable(loaded):
    from maps_utils import relations as R

    toks = [R.filter_single_token(R.load(n), loaded.tokenizer) for n in R.list_relations()]
    return [t for t in toks if t.usable]


def run_engine(name: str, device: str, variant: str) -> dict:
    import maps_utils
    from maps_utils.scores import static_scores
    from maps_utils.store import RunOptions

    loaded = maps_utils.load(name, device=device)
    rss_loaded = _peak_rss_gib()
    t0 = time.perf_counter()
    res = static_scores(loaded, variant=variant, run=RunOptions(results_dir=None, progress=False))
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    h = loaded.weights
    n = sum(r.n for r in res.relations)
    flops = h.n_layers * (h.n_kv_heads * 2 * n * h.d_model * h.d_head
                          + h.n_heads * 2 * h.d_head * h.vocab_size * (h.d_model + n))
    out = {"model": name, "mode": "engine", "seconds": wall, "pairs": n, "relations": len(res.relations),
           "heads": h.n_layers * h.n_heads, "factored_gflop": flops / 1e9, "peak_rss_gib": _peak_rss_gib(),
           "rss_after_load_gib": rss_loaded}
    if loaded.device.type == "cuda":
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_naive(name: str, device: str, variant: str, layers: str) -> dict:
    import maps_utils
    from maps_utils.sources import source_vectors

    loaded = maps_utils.load(name, device=device)
    h = loaded.weights
    rels = _usable(loaded)
    todo = list(range(h.n_layers)) if layers == "all" else sorted(
        {round(i * (h.n_layers - 1) / max(1, int(layers) - 1)) for i in range(int(layers))})
    t0 = time.perf_counter()
    with torch.no_grad():
        for layer in todo:
            for head in range(h.n_heads):
                w_vo = h.W_V(layer)[head] @ h.W_O(layer)[head]
                for rel in rels:
                    k = rel.relation.k()
                    x = source_vectors(h, rel.source_ids, variant, layer)
                    full = (x @ w_vo) @ h.U
                    tgt = torch.tensor(rel.target_ids, device=full.device)[:, None]
                    (torch.topk(full, k, dim=1).indices == tgt).any(1).float().mean().item()
                    (torch.topk(-full, k, dim=1).indices == tgt).any(1).float().mean().item()
    wall = time.perf_counter() - t0
    return {"model": name, "mode": "naive", "seconds": wall * h.n_layers / len(todo), "measured_seconds": wall,
            "measured_layers": len(todo), "pairs": sum(len(r) for r in rels), "relations": len(rels),
            "heads": h.n_layers * h.n_heads, "peak_rss_gib": _peak_rss_gib()}


def matmul_gflops(device: str) -> float:
    a = torch.randn(4096, 2048, device=device)
    b = torch.randn(2048, 4096, device=device)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 5 * 2 * 4096 * 2048 * 4096 / (time.perf_counter() - t0) / 1e9


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"benchmark step {args} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="first_mlp", help="the paper's variant by default")
    parser.add_argument("--naive-layers", default="3", help="layers the naive loop is timed on, or 'all'")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--step", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:  # one measurement in this (fresh) process
        mode, name = args.step
        fn = run_engine if mode == "engine" else run_naive
        extra = () if mode == "engine" else (args.naive_layers,)
        print(json.dumps(fn(name, args.device, args.variant, *extra)))
        return

    from maps_utils.manifest import build_manifest, write_manifest

    t_all = time.perf_counter()
    gflops = matmul_gflops(args.device)
    print(f"float32 matmul throughput on {args.device}: {gflops:.0f} GFLOP/s", flush=True)
    rows = []
    for name in args.models:
        common = ["--device", args.device, "--variant", args.variant, "--naive-layers", args.naive_layers]
        engine = _subprocess([*common, "--step", "engine", name])
        naive = _subprocess([*common, "--step", "naive", name])
        floor = engine["factored_gflop"] / gflops
        engine.update(speedup_vs_naive=naive["seconds"] / engine["seconds"], floor_seconds=floor,
                      ratio_to_floor=engine["seconds"] / floor)
        rows += [engine, naive]
        print(f"{name}: engine {engine['seconds']:.1f} s, naive {naive['seconds']:.1f} s "
              f"({naive['measured_seconds']:.1f} s on {naive['measured_layers']} layers, scaled), "
              f"speed-up {engine['speedup_vs_naive']:.1f}x, floor {floor:.1f} s, "
              f"peak RSS {engine['peak_rss_gib']:.2f} GiB", flush=True)
    table = pd.DataFrame(rows).round(3)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "static.csv", index=False)
    write_manifest(out / "static.manifest.json", build_manifest(
        parameters={**vars(args), "matmul_gflops": round(gflops, 1)}, wall_seconds=time.perf_counter() - t_all))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
