"""`maps` command: scripted access to the same functions the notebooks call.

    maps models                       list the embedded models
    maps info [MODEL] [--device D]    load a model and print its head geometry as JSON
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except MapsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
