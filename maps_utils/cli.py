"""`maps` command: scripted access to the same functions the notebooks call.

    maps models                       list the embedded models
    maps info [MODEL] [--device D]    load a model and print its head geometry as JSON
    maps relations [--models M ...]   usable single-token pairs per shipped relation and model
    maps relations FILE ...           the same for relation files of your own (JSON pairs or CSV)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import MapsError
from .models import DEFAULT_MODEL, available_models, load


def _info(args: argparse.Namespace) -> int:
    loaded = load(args.model, device=args.device, dtype=args.dtype)
    print(json.dumps({**loaded.manifest(), "load_seconds": round(loaded.load_seconds, 2),
                      "from_cache": loaded.from_cache}, indent=2))
    return 0


def _relations(args: argparse.Namespace) -> int:
    import pandas as pd

    from . import relations as R
    from .models import load_tokenizer

    rels = [R.load(p) for p in args.files] if args.files else R.load_all()
    toks = {m: load_tokenizer(m) for m in args.models}
    table = R.usable_pairs_table(toks, rels, min_pairs=args.min_pairs)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(table.to_string(index=False))
    if args.show_dropped:
        for rel in rels:
            for m, tok in toks.items():
                dropped = R.filter_single_token(rel, tok).dropped
                print(f"\n{rel.name} / {m}: {len(dropped)} dropped: " + "; ".join(f"{s}->{t}" for s, t in dropped))
    return 0


def _models(args: argparse.Namespace) -> int:
    for name, description in available_models().items():
        print(f"{name:16s} {description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maps", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the embedded models").set_defaults(func=_models)
    info = sub.add_parser("info", help="load a model and print its head geometry")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    info.add_argument("--device", default="auto")
    info.add_argument("--dtype", default="float32")
    info.set_defaults(func=_info)
    rel = sub.add_parser("relations", help="usable single-token pairs per relation and model")
    rel.add_argument("files", nargs="*", help="relation files (default: every shipped relation)")
    rel.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    rel.add_argument("--min-pairs", type=int, default=30)
    rel.add_argument("--show-dropped", action="store_true", help="list the pairs the filter drops")
    rel.set_defaults(func=_relations)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except MapsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
