"""`maps` command: scripted access to the same functions the notebooks call.

    maps models                       list the embedded models
    maps info [MODEL] [--device D]    load a model and print its head geometry as JSON
    maps relations [--models M ...]   usable single-token pairs per shipped relation and model
    maps relations FILE ...           the same for relation files of your own (JSON pairs, CSV or TSV)
    maps score [MODEL] [--relation R ...] [--representation V] [--k K] [--copying]
                                      static relation scores (cached under results/); prints the top heads
    maps check-options [MODEL] [--device D] [--dtype T]
                                      check options without loading anything (`make all` runs it first)
    maps atlas [MODEL] [--out PATH]   write the self-contained HTML head atlas (default reports/MODEL/atlas.html)
    maps convert FOLDER [--out OUT]   a safetensors copy of a .bin checkpoint, one shard at a time (to stream it)
    info, score, atlas and check-options take --stream / --no-stream (default: stream when the checkpoint exceeds
                                      the free memory of the device)
    info, score, atlas and check-options take --device-map auto|balanced|JSON [--max-memory 0:70GiB,cpu:200GiB]
    [--offload-folder DIR]: the model spread over GPUs, CPU memory and disk by accelerate
    maps run-manifest MODEL --step S --seconds T [--notebook NB]
                                      record a step in results/MODEL/manifest.json (`make all` calls it)

Examples:
    maps score smollm2-135m --relation country_capital name_copying
    maps atlas gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from . import relations as R
from .core.errors import MapsError
from .core.params import check_parameters
from .core.store import RunOptions, check_results_dir
from .models.checkpoint import convert_bin
from .models.loading import DEFAULT_MODEL, available_models, check_options, load, load_tokenizer
from .report.atlas import build_atlas
from .report.run_manifest import record_step
from .static import scores as SC
from .static import sources
from .static.tables import top_heads


def _check(args: argparse.Namespace) -> None:
    """Every option is checked before anything is loaded (each failure is one sentence)."""

    check_options(args.model, args.device, args.dtype, stream=getattr(args, "stream", None), **_placement(args))
    if getattr(args, "representation", None):
        sources.check(args.representation)
    if getattr(args, "results_dir", None):
        check_results_dir(args.results_dir)  # a read-only one still serves stored results; writers check before work
    ranged = {name: getattr(args, name) for name in ("k", "rank_cap", "top", "min_pairs") if hasattr(args, name)}
    check_parameters("--", **ranged)


def _placement(args: argparse.Namespace) -> dict[str, object]:
    """``load``'s device_map, max_memory and offload_folder from the command line (None where not given)."""
    return {name: getattr(args, name, None) for name in ("device_map", "max_memory", "offload_folder")}


def _placement_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                     help="read the weights from the safetensors shards one module at a time (default: when the "
                          "checkpoint is larger than the device's free memory)")
    cmd.add_argument("--device-map", default=None,
                     help="spread the model over GPUs, CPU memory and disk with accelerate: auto, balanced, "
                          "balanced_low_0, sequential, or a JSON {module: device} (or a .json file)")
    cmd.add_argument("--max-memory", default=None, help="with --device-map: the most each device may hold, e.g. "
                                                        "0:70GiB,1:70GiB,cpu:200GiB")
    cmd.add_argument("--offload-folder", default=None,
                     help="with --device-map: where weights sent to disk are written, if the checkpoint cannot serve "
                          "them (.bin checkpoints)")


def _check_options(args: argparse.Namespace) -> int:
    _check(args)
    return 0


def _info(args: argparse.Namespace) -> int:
    _check(args)
    loaded = load(args.model, device=args.device, dtype=args.dtype, stream=args.stream, **_placement(args))
    print(json.dumps({**loaded.manifest(), "load_seconds": round(loaded.load_seconds, 2),
                      "from_cache": loaded.from_cache}, indent=2))
    return 0


def _relations(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd


    check_parameters("--", min_pairs=args.min_pairs)
    # --models takes every word after it (nargs="+"): relation files among them are files, not models
    moved = [m for m in args.models or [] if Path(m).suffix.lower() in (".json", ".csv", ".tsv") and Path(m).is_file()]
    files = [*args.files, *moved]
    models = [m for m in args.models or [] if m not in moved] or ["smollm2-135m", "gemma3-270m"]
    rels = [R.load(p) for p in files] if files else R.load_all()
    toks = {m: load_tokenizer(m) for m in models}
    table = R.usable_pairs_table(toks, rels, min_pairs=args.min_pairs)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(table.to_string(index=False))
    if args.show_dropped:
        for rel in rels:
            for m, tok in toks.items():
                dropped = R.filter_single_token(rel, tok).dropped
                print(f"\n{rel.name} / {m}: {len(dropped)} dropped: " + "; ".join(f"{s}->{t}" for s, t in dropped))
    return 0


def _score(args: argparse.Namespace) -> int:
    import pandas as pd


    _check(args)
    copying = True if args.copying else None
    relations = [R.load(r, copying=copying) for r in args.relation] if args.relation else None
    loaded = load(args.model, device=args.device, dtype=args.dtype, stream=args.stream, **_placement(args))
    res = SC.static_scores(loaded, relations, representation=args.representation or loaded.representation,
                           rank_cap=args.rank_cap, run=RunOptions(results_dir=args.results_dir))
    with pd.option_context("display.width", 200, "display.max_colwidth", 120):
        print(top_heads(res.table(k=args.k), n=args.top).to_string(index=False))
    for name, n in res.skipped.items():
        print(f"skipped {name}: {n} usable single-token pairs (fewer than {R.MIN_PAIRS})", file=sys.stderr)
    where = "read from" if res.from_cache else "written to"
    print(f"\nscores ({res.representation}) {where} {args.results_dir}/ (tidy table: scores.csv with a manifest)")
    return 0


def _atlas(args: argparse.Namespace) -> int:

    _check(args)
    loaded = load(args.model, device=args.device, dtype=args.dtype, stream=args.stream, **_placement(args))
    path = build_atlas(loaded, args.results_dir, args.out, representation=args.representation)
    print(f"atlas: {path}")
    return 0


def _run_manifest(args: argparse.Namespace) -> int:

    path = record_step(args.results_dir, args.model, args.step, args.seconds, args.notebook)
    print(f"run manifest: {path} ({args.step}: {args.seconds:.0f} s)")
    return 0


class _RenamedOption(argparse.Action):
    """An option's old spelling (``new``: its name now): stored as the new one, with a notice naming it; the old
    spelling goes in the next release."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        text = f"{option_string} is renamed {self.new}; use {self.new} (the old spelling goes in the next release)"
        warnings.warn(text, DeprecationWarning, stacklevel=2)
        print(f"note: {text}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _convert(args: argparse.Namespace) -> int:
    out = convert_bin(args.folder, args.out)
    print(f"wrote {out}: stream it with `maps score {out} --stream`")
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
    _placement_options(info)
    info.set_defaults(func=_info)
    rel = sub.add_parser("relations", help="usable single-token pairs per relation and model")
    rel.add_argument("files", nargs="*", help="relation files, .json, .csv or .tsv (default: every shipped relation)")
    rel.add_argument("--models", nargs="+", default=None,
                     help="tokenizers to filter with (default: smollm2-135m gemma3-270m); relation files listed "
                          "here count as files")
    rel.add_argument("--min-pairs", type=int, default=30)
    rel.add_argument("--show-dropped", action="store_true", help="list the pairs the filter drops")
    rel.set_defaults(func=_relations)
    for name, func, text in (("score", _score, "static relation scores of a model; prints the top heads"),
                             ("atlas", _atlas, "write the HTML head atlas of a model from its results")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"embedded name, HF id or path (default {DEFAULT_MODEL})")
        cmd.add_argument("--device", default="auto")
        cmd.add_argument("--dtype", default="float32")
        cmd.add_argument("--representation", default=None,
                         help="source representation (maps_utils.static.sources; default: the model's registered one)")
        cmd.add_argument("--variant", dest="representation", action=_RenamedOption, new="--representation",
                         help=argparse.SUPPRESS)
        cmd.add_argument("--results-dir", default="results", help="where result tables and caches live")
        _placement_options(cmd)
        cmd.set_defaults(func=func)
        if name == "score":
            cmd.add_argument("--relation", nargs="+", help="relation names or files (default: every shipped relation)")
            cmd.add_argument("--top", type=int, default=5, help="heads listed per relation")
            cmd.add_argument("--k", type=int, default=None,
                             help="top-k of the score for every relation, up to --rank-cap (default: the paper's rule, "
                                  "1 for copying relations and 10 for the others; the table's k column shows the k used)")
            cmd.add_argument("--rank-cap", type=int, default=100,
                             help="ranks are exact up to this cap, so any k <= cap is scored from one run (default 100)")
            cmd.add_argument("--copying", action="store_true",
                             help="treat the relation files as copying relations (k = 1); files whose name contains "
                                  "'copying' already are")
        else:
            cmd.add_argument("--out", default=None, help="the HTML file (default reports/<model>/atlas.html)")
    conv = sub.add_parser("convert", help="write a safetensors copy of a checkpoint stored as PyTorch .bin shards "
                                          "(one shard in memory at a time), so it can be streamed")
    conv.add_argument("folder")
    conv.add_argument("--out", default=None, help="the new folder (default <folder>-safetensors)")
    conv.set_defaults(func=_convert)
    chk = sub.add_parser("check-options", help="check a model, device and dtype without loading anything (make all)")
    chk.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    chk.add_argument("--device", default="auto")
    chk.add_argument("--dtype", default="float32")
    _placement_options(chk)
    chk.add_argument("--results-dir", default=None)
    chk.set_defaults(func=_check_options)
    man = sub.add_parser("run-manifest", help="record one executed notebook in results/MODEL/manifest.json (make all)")
    man.add_argument("model")
    man.add_argument("--step", required=True, help="the step's name, e.g. 01_static_scores")
    man.add_argument("--seconds", type=float, required=True, help="its wall time")
    man.add_argument("--notebook", default=None, help="the executed notebook (its papermill parameters are recorded)")
    man.add_argument("--results-dir", default="results")
    man.set_defaults(func=_run_manifest)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except MapsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was finished is kept (finished layers and relations); run the same command again "
              "to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
