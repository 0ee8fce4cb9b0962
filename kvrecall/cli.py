"""The ``kvrecall`` command line.

Each subcommand lives in its own module under :mod:`kvrecall.commands` and exposes
``register(subparsers) -> None``; the module is imported only when listed in :data:`COMMANDS`.
Heavy imports (torch, transformers, grpc) happen inside each command's ``run`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module name under kvrecall.commands) — order is the order shown by --help.
COMMANDS = [
    "demo",
    "encode_demo",
    "calibrate_codec",
    "serve",
    "calibrate_retriever",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvrecall",
        description=(
            "Store long-context KV caches once, compressed, and load them back instead of recomputing them; "
            "retrieve only the tokens each decode step needs when a context is too long for the GPU."
        ),
    )
    from kvrecall import __version__

    parser.add_argument("--version", action="version", version=f"kvrecall {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"kvrecall.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kvrecall.commands.{name}":
                continue  # command not built yet in this checkout
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
