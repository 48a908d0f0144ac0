"""Static-score benchmark: the engine vs the naive per-head loop vs the dense floor, in one run.

For each model and each source representation (the paper's ``first_mlp`` and ``raw``), and for each relation set (every
usable relation together, and each of --one alone):
  engine  maps_utils.static.scores.static_scores on that set, no files (relation and suppression ranks of every head)
  naive   the reference code's way: per head W_VO = W_V W_O (d×d); per relation the full (n × V) rows of M and
          torch.topk for the relation and the suppression score. Every layer costs the same, so it is timed on
          --naive-layers layers and scaled to all layers (pass --naive-layers all to time every one)
  floor   the cheapest dense exact computation of every row of M (model space: n·d_model·V per head, or head space
          with its W_O[h] U product, whichever has fewer FLOPs) over this device's float32 matmul throughput,
          measured in the same run
Each measurement runs in a fresh process (peak memory is that process's peak resident set).
Writes results/bench/static.csv (its column ``variant`` is the representation, the name the table has always used)
and its manifest, and prints a short table.
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
REPRESENTATIONS = ("first_mlp", "raw")
ONE = ("country_capital", "copying")  # the paper's running example, and the largest relation


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _usable(loaded, names: list[str] | None):
    from maps_utils import relations as R

    toks = [R.filter_single_token(R.load(n), loaded.tokenizer) for n in (names or R.list_relations())]
    return [t for t in toks if t.usable]


def dense_gflop(h, n_pairs: int) -> float:
    """FLOPs of every row of M for ``n_pairs`` pairs in every head: model space or head space, the cheaper."""
    model = h.n_layers * h.n_heads * 2 * n_pairs * h.d_model * h.vocab_size
    head = h.n_layers * h.n_heads * 2 * h.d_head * h.vocab_size * (h.d_model + n_pairs)
    return min(model, head) / 1e9


def run_engine(name: str, device: str, representation: str, names: list[str] | None) -> dict:
    import maps_utils
    from maps_utils.core.store import RunOptions
    from maps_utils.static.scores import static_scores

    loaded = maps_utils.load(name, device=device)
    t0 = time.perf_counter()
    res = static_scores(loaded, names, representation=representation, run=RunOptions(results_dir=None, progress=False))
    _sync(loaded.device)
    wall = time.perf_counter() - t0
    n = sum(r.n for r in res.relations)
    out = {"seconds": wall, "pairs": n, "dense_gflop": dense_gflop(loaded.weights, n), "peak_rss_gib": _peak_rss_gib()}
    if loaded.device.type == "cuda":
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_naive(name: str, device: str, representation: str, names: list[str] | None, layers: str) -> dict:
    import maps_utils
    from maps_utils.static.sources import source_vectors

    loaded = maps_utils.load(name, device=device)
    h = loaded.weights
    rels = _usable(loaded, names)
    todo = list(range(h.n_layers)) if layers == "all" else sorted(
        {round(i * (h.n_layers - 1) / max(1, int(layers) - 1)) for i in range(int(layers))})
    t0 = time.perf_counter()
    with torch.no_grad():
        for layer in todo:
            for head in range(h.n_heads):
                w_vo = h.W_V(layer)[head] @ h.W_O(layer)[head]
                for rel in rels:
                    k = rel.relation.k()
                    x = source_vectors(h, rel.source_ids, representation, layer)
                    full = (x @ w_vo) @ h.U
                    tgt = torch.tensor(rel.target_ids, device=full.device)[:, None]
                    (torch.topk(full, k, dim=1).indices == tgt).any(1).float().mean().item()
                    (torch.topk(-full, k, dim=1).indices == tgt).any(1).float().mean().item()
    _sync(loaded.device)
    wall = time.perf_counter() - t0
    return {"seconds": wall * h.n_layers / len(todo), "measured_seconds": wall, "measured_layers": len(todo),
            "pairs": sum(len(r) for r in rels), "peak_rss_gib": _peak_rss_gib()}


def matmul_gflops(device: str) -> float:
    a = torch.randn(4096, 2048, device=device)
    b = torch.randn(2048, 4096, device=device)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    _sync(device)
    return 5 * 2 * 4096 * 2048 * 4096 / (time.perf_counter() - t0) / 1e9


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"benchmark step {args} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(args, name: str, representation: str, relations: str) -> dict:
    common = ["--device", args.device, "--naive-layers", args.naive_layers, "--step", name, representation, relations]
    engine = _subprocess([*common, "engine"])
    naive = _subprocess([*common, "naive"])
    floor = engine["dense_gflop"] / args.gflops
    return {"model": name, "variant": representation, "relations": relations, "pairs": engine["pairs"],
            "engine_s": engine["seconds"], "naive_s": naive["seconds"], "floor_s": floor,
            "engine_vs_naive": naive["seconds"] / engine["seconds"], "engine_over_floor": engine["seconds"] / floor,
            "naive_measured_s": naive["measured_seconds"], "naive_measured_layers": naive["measured_layers"],
            "dense_gflop": engine["dense_gflop"], "engine_peak_rss_gib": engine["peak_rss_gib"],
            "naive_peak_rss_gib": naive["peak_rss_gib"], **({"cuda_peak_gib": engine["cuda_peak_gib"]}
                                                            if "cuda_peak_gib" in engine else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--representations", "--variants", nargs="+", default=list(REPRESENTATIONS))
    parser.add_argument("--one", nargs="*", default=list(ONE), help="relations also benchmarked alone")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--naive-layers", default="3", help="layers the naive loop is timed on, or 'all'")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--step", nargs=4, metavar=("MODEL", "REPRESENTATION", "RELATIONS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:  # one measurement in this (fresh) process
        name, representation, relations, mode = args.step
        names = None if relations == "all" else [relations]
        fn = run_engine if mode == "engine" else run_naive
        extra = () if mode == "engine" else (args.naive_layers,)
        print(json.dumps(fn(name, args.device, representation, names, *extra)))
        return

    from maps_utils.core.manifest import build_manifest, write_manifest

    t_all = time.perf_counter()
    args.gflops = matmul_gflops(args.device)
    print(f"float32 matmul throughput on {args.device}: {args.gflops:.0f} GFLOP/s", flush=True)
    rows = []
    for name in args.models:
        for representation in args.representations:
            for relations in ["all", *args.one]:
                row = _measure(args, name, representation, relations)
                rows.append(row)
                print(f"{name} {representation} {relations}: engine {row['engine_s']:.1f} s, naive {row['naive_s']:.1f} s, "
                      f"floor {row['floor_s']:.1f} s -> {row['engine_vs_naive']:.1f}x naive, "
                      f"{row['engine_over_floor']:.2f}x floor", flush=True)
    gflops_end = matmul_gflops(args.device)
    table = pd.DataFrame(rows)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    table.round(4).to_csv(out / "static.csv", index=False)
    # the manifest keeps the option's name of 0.1 (``variants``)
    params = {("variants" if k == "representations" else k): v for k, v in vars(args).items() if k != "gflops"}
    write_manifest(out / "static.manifest.json", build_manifest(
        parameters={**params, "matmul_gflops_start": round(args.gflops, 1), "matmul_gflops_end": round(gflops_end, 1)},
        wall_seconds=time.perf_counter() - t_all))
    cols = ["model", "variant", "relations", "pairs", "engine_s", "naive_s", "floor_s", "engine_vs_naive",
            "engine_over_floor"]
    print(f"\nfloat32 matmul: {args.gflops:.0f} GFLOP/s at the start, {gflops_end:.0f} at the end")
    print(table[cols].round(2).to_string(index=False))


if __name__ == "__main__":
    main()
