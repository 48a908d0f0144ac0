"""Load-time benchmark of the embedded models: GGUF dequantisation vs the safetensors cache.

Each model is loaded three ways in one run, in a fresh private cache directory:
  gguf      use_cache=False: transformers dequantises the GGUF file (what every load would cost)
  convert   first cached load: dequantise once and write the safetensors cache
  cached    second cached load: read the cache
Writes results/bench/load_times.csv with a manifest beside it.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from maps_utils import load
from maps_utils.core.manifest import build_manifest, write_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t_all = time.perf_counter()
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="maps-bench-") as cache:
            weights = {}
            for mode, use_cache in (("gguf", False), ("convert", True), ("cached", True)):
                t0 = time.perf_counter()
                loaded = load(name, device="cpu", dtype="float32", cache_dir=cache, use_cache=use_cache)
                seconds = time.perf_counter() - t0
                weights[mode] = loaded.model.state_dict()
                rows.append({"model": name, "mode": mode, "seconds": round(seconds, 2), "from_cache": loaded.from_cache})
                print(f"{name:14s} {mode:8s} {seconds:6.1f} s", flush=True)
                del loaded
            same = all(torch.equal(weights["gguf"][k], weights["cached"][k]) for k in weights["gguf"])
            for row in rows[-3:]:
                row["identical_to_gguf"] = same
    table = pd.DataFrame(rows)
    base = table.pivot(index="model", columns="mode", values="seconds")
    table["speedup_vs_gguf"] = [round(base.loc[r.model, "gguf"] / r.seconds, 1) for r in table.itertuples()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "load_times.csv", index=False)
    write_manifest(out / "load_times.manifest.json",
                   build_manifest(parameters=vars(args), wall_seconds=time.perf_counter() - t_all))
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
