"""Cost of each source representation relative to the paper's first_mlp, in one run per model.

For each model and representation:
  static    maps_utils.static.scores.static_scores on every usable relation (all heads, relation + suppression ranks;
            nothing read from or written to the results store), and the part of it spent making the source vectors
  vectors   making the source vectors of those relations' sources for every layer (the representation's own cost)
  saliency  maps_utils.static.salient.saliency (norm amplification of every head over the whole vocabulary, notebook 04's
            first step) for the --saliency representations
Ratios are to first_mlp (static, vectors) and first_mlp_all (saliency) in the same run, on one thread. Writes results/bench/sources.csv and a
manifest.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["first_mlp", "raw", "first_mlp_all", "raw+norm", "first_mlp+norm", "raw_mlp+norm", "block0+norm",
           "context_free", "context_free_4"]


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, representations: list[str], salient: list[str]) -> list[dict]:
    import maps_utils
    from maps_utils.core.store import RunOptions
    from maps_utils.static import sources
    from maps_utils.static.salient import saliency
    from maps_utils.static.scores import static_scores

    loaded = maps_utils.load(name, device="cpu")
    weights = loaded.weights
    run = RunOptions(results_dir=None, progress=False)
    ids = [i for r in static_scores(loaded, representation="first_mlp", run=run).relations for i in r.source_ids]  # warm-up
    rows = []
    for rep in representations:
        rows.append({"model": name, "representation": rep, "step": "static (all relations)",
                     "seconds": _time(lambda rep=rep: static_scores(loaded, representation=rep, run=run))})
        rows.append({"model": name, "representation": rep, "step": f"vectors ({len(ids)} sources x all layers)",
                     "seconds": _time(lambda rep=rep: [sources.SourceVectors(weights, ids, rep).layer(la)
                                                      for la in range(weights.n_layers)])})
        print(rows[-2], rows[-1], flush=True)
    for rep in salient:
        rows.append({"model": name, "representation": rep, "step": f"saliency ({weights.vocab_size} tokens)",
                     "seconds": _time(lambda rep=rep: saliency(weights, representation=rep, progress=False))})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--representations", nargs="+", default=DEFAULT)
    parser.add_argument("--saliency", nargs="+", default=["first_mlp_all", "context_free"])
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)  # ratios on a shared 2-core machine: one thread, as for generation

    from maps_utils.core.manifest import build_manifest, write_manifest

    t_all = time.perf_counter()
    rows = [row for name in args.models for row in measure(name, args.representations, args.saliency)]
    table = pd.DataFrame(rows)
    table["kind"] = table.step.str.split(" ").str[0]
    refs = {"static": "first_mlp", "vectors": "first_mlp", "saliency": "first_mlp_all"}
    base = {(r.model, r.kind): r.seconds for r in table.itertuples() if r.representation == refs[r.kind]}
    table["ratio"] = [r.seconds / base.get((r.model, r.kind), float("nan")) for r in table.itertuples()]
    table = table.round(3)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "sources.csv", index=False)
    write_manifest(out / "sources.manifest.json", build_manifest(parameters=vars(args),
                                                                 wall_seconds=time.perf_counter() - t_all))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
