"""The ``hescape`` command: a thin dispatcher over the library.

Each sub-command group lives in its own module exposing ``add_parser(subparsers)``; the
parser it adds sets ``func`` (called with the parsed args, returns an exit code).
Library errors (``ValueError`` subclasses with a clear message) are printed without a
stack trace and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys

GROUPS = ("data", "train", "evaluate", "study")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hescape",
        description="Contrastive H&E <-> spatial-expression studies: data, training, "
        "evaluation and Ray Tune studies with MLflow lineage.",
    )
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for group in GROUPS:
        module = importlib.import_module(f"hescape.cli.{group}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hescape.cli.study import with_action

    parser = build_parser()
    args = parser.parse_args(with_action(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, PermissionError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
