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


def is_user_error(exc: BaseException) -> bool:
    """True for errors that mean bad input or an unusable environment, not a bug in kvrecall.

    Those are kvrecall's own typed errors (all derive from ``ValueError``: ``ModelError``, ``CodecError``,
    ``RetrieverError``, ``ConfigError``, ...), the store client's ``KVStoreError`` and file-system errors
    (a missing or unreadable path). Anything else is a bug and keeps its traceback.
    """
    own = type(exc).__module__.split(".")[0] == "kvrecall"
    if own and isinstance(exc, ValueError):
        return True
    if own and type(exc).__name__ in ("KVStoreError", "ChecksumError"):
        return True
    return isinstance(exc, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input prints one line ``kvrecall CMD: error: ...`` and returns 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is bad input
        if not is_user_error(exc):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"kvrecall {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
