"""Batching and threads where they pay: the static engine and the dynamic pass under other prompt batches, torch
thread counts and OpenMP wait policies, against the current path (batch 64, torch's own thread count, OpenMP's
default wait policy), in one run.

    python bench/bench_passes.py --models smollm2-135m gemma3-270m     # -> results/bench/passes.csv (+ manifest)
    python bench/bench_passes.py --busy                                # the same with a busy loop on one core

Each configuration runs in its own process (the wait policy is read when OpenMP starts), ``--repeats`` times,
interleaved with the others (A B C A B C ...); the table has each one's median and its ratio to the current path's,
and whether its results are the current path's bits (a sha256 of every rank): a batch of another size rounds
float32 activations differently (a prompt's activations depend on the other prompts in its batch), so its ranks may
move at near-ties. ``--busy`` keeps one core busy meanwhile, as another job on the machine would: OpenMP's default
policy then makes two threads wait for each other by spinning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

RELATIONS = ["country_capital", "name_copying"]
# (step, batch, threads, OMP_WAIT_POLICY); None: torch's / OpenMP's default. The first of each step is the current path
CONFIGS = [("static scores", None, None, None), ("static scores", None, 1, None),
           ("static scores", None, 2, "passive"),
           ("dynamic scores", 64, None, None), ("dynamic scores", 64, 1, None), ("dynamic scores", 64, 2, "passive"),
           ("dynamic scores", 128, None, None), ("dynamic scores", 256, None, None)]
DESCRIBER = [("describer answer", None, 1, None), ("describer answer", None, 2, None),
             ("describer answer", None, 2, "passive")]  # the local LLM's own threads (llama.cpp), not torch's
PROMPT = ("A head maps these tokens: ' France' -> ' Paris', ' Japan' -> ' Tokyo', ' Italy' -> ' Rome'. "
          "Describe in one sentence what it does.")


def child(model: str, step: str, batch: int | None, threads: int | None, relations: list[str]) -> dict:
    """One timed step in this process (the model loaded first, untimed)."""
    import torch

    import maps_utils
    from maps_utils.core.store import RunOptions
    from maps_utils.dynamic import scores as DY
    from maps_utils.static import scores as SC

    if step == "describer answer":
        from maps_utils.describe.local_llm import LocalLLM

        llm = LocalLLM(threads=threads, n_ctx=512)
        llm.complete("Say yes.", schema=None, max_tokens=1)  # loaded, untimed
        t0 = time.perf_counter()
        text = llm.complete(PROMPT, schema=None, max_tokens=48)["content"]
        return {"seconds": time.perf_counter() - t0, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                "threads_used": threads}
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = maps_utils.load(model)
    run = RunOptions(results_dir=None, progress=False, batch_size=batch)
    t0 = time.perf_counter()
    if step == "static scores":
        res = SC.static_scores(loaded, relations, run=run)
        ranks = [t for r in res.relations for t in res.ranks_of(r.name)]
    else:
        ranks = [r.ranks for r in DY.dynamic_scores(loaded, relations, run=run, readouts=False).relations]
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in ranks)).hexdigest()
    return {"seconds": seconds, "sha256": digest, "threads_used": torch.get_num_threads()}


def _run_child(model, config, relations) -> dict:
    step, batch, threads, policy = config
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--child", json.dumps([model, step, batch, threads, relations])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_model(model: str, repeats: int, relations: list[str], configs: list[tuple]) -> pd.DataFrame:
    got: dict[tuple, list[dict]] = {c: [] for c in configs}
    for _ in range(repeats):
        for config in configs:
            got[config].append(_run_child(model, config, relations))
            print(f"{model} · {config}: {got[config][-1]['seconds']:.1f} s", flush=True)
    rows = []
    for config in configs:
        step, batch, threads, policy = config
        current = next(c for c in configs if c[0] == step)
        median = statistics.median(r["seconds"] for r in got[config])
        rows.append({"model": model if step != "describer answer" else "qwen2.5-coder-1.5b", "step": step, "batch": (batch or 64) if step == "dynamic scores" else None,
                     "threads": got[config][0]["threads_used"], "wait_policy": policy or "default",
                     "current_path": config == current, "seconds": round(median, 2),
                     "ratio_to_current": round(median / statistics.median(r["seconds"] for r in got[current]), 3),
                     "same_bits": got[config][0]["sha256"] == got[current][0]["sha256"]})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--relations", nargs="+", default=RELATIONS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument("--describer", action="store_true",
                        help="also one local describer answer (needs `make describer-model`) with 1 and 2 threads")
    parser.add_argument("--out", type=Path, default=Path("results/bench/passes.csv"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return 0
    from maps_utils.core.manifest import build_manifest
    from maps_utils.core.store import write_table

    t0 = time.perf_counter()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        tables = [bench_model(m, args.repeats, args.relations, CONFIGS) for m in args.models]
        if args.describer:
            tables.append(bench_model(args.models[0], args.repeats, args.relations, DESCRIBER))
        table = pd.concat(tables, ignore_index=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    print(table.to_string(index=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in vars(args).items() if k != "child"} | {"out": str(args.out), "cpus": os.cpu_count()}
    write_table(table, args.out, build_manifest(parameters=params, wall_seconds=time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
