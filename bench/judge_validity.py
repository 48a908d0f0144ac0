"""Judge validity: can a judge verify descriptions we know are right?

For each model, notebook 04's executable step (default sample, seed 0) gives the relation heads' gold cases: each
relation head's held-out salient rows against non-relation heads' rows, its relation as the gold description, and
a non-relation head's description as the control (maps_utils.describe.exec_study.gold_cases). Each judge scores both:

  execution   the gold clause run on the rows (always)
  <LLM>       each --judges model through notebook 04's detection scoring (local llama.cpp models answer one
              yes/no line per row, read from their logits; a --base-url server answers with a JSON list)

A judge is valid where its mean gold score is >= 0.8 and its mean control lies in 0.4-0.6. Prints the table per
judge and writes results/bench/judge_validity.csv (per head) and judge_validity.summary.csv with a manifest.
The local LLMs need `make describer-model` (Qwen2.5-Coder-1.5B); answers are cached under results/bench/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--judges", nargs="*", default=["qwen2.5-coder-1.5b"], help="local LLMs or server models")
    ap.add_argument("--base-url", default=None, help="an OpenAI-compatible server for the --judges models")
    ap.add_argument("--results-dir", default=str(ROOT / "results"))
    args = ap.parse_args()

    import maps_utils
    from maps_utils.core.manifest import build_manifest, write_manifest
    from maps_utils.core.store import RunOptions
    from maps_utils.describe import exec_study as ES
    from maps_utils.describe.client import Describer
    from maps_utils.describe.endpoints import resolve_endpoint
    from maps_utils.static.sources import salient_representation

    out = Path(args.results_dir) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tables = []
    for name in args.models:
        loaded = maps_utils.load(name, device="cpu")
        ex = ES.describe_executable(loaded, representation=salient_representation(loaded.representation),
                                    run=RunOptions(results_dir=args.results_dir, seed=0))
        tables.append(ex.validity.assign(model=name))
        for judge in args.judges:
            describer = Describer(resolve_endpoint(judge, args.base_url), out / "judge_validity.cache.jsonl")
            try:
                start = time.perf_counter()
                tables.append(ex.llm_validity(describer).assign(model=name))
                print(f"{name}: {describer.endpoint.label} judged {len(ex.gold)} gold cases in "
                      f"{time.perf_counter() - start:.0f} s")
            finally:
                describer.close()
    table = pd.concat(tables, ignore_index=True)
    summary = pd.concat([ES.validity_summary(g).assign(model=m) for m, g in table.groupby("model", sort=False)])
    print(summary.round(3).to_string(index=False))
    table.to_csv(out / "judge_validity.csv", index=False)
    summary.to_csv(out / "judge_validity.summary.csv", index=False)
    write_manifest(out / "judge_validity.manifest.json",
                   build_manifest(parameters=vars(args), wall_seconds=time.perf_counter() - t0))


if __name__ == "__main__":
    main()
