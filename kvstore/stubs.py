"""Regenerate or check the committed gRPC stubs in ``kvstore/v1/`` from ``proto/``.

``python -m kvrecall.kvstore.stubs --write`` regenerates ``kvstore_pb2.py``, ``kvstore_pb2.pyi`` and
``kvstore_pb2_grpc.py`` with ``grpc_tools.protoc`` into a temporary directory and copies them into place.
``python -m kvrecall.kvstore.stubs --check`` regenerates into a temporary directory and compares byte for byte,
exiting with status 1 and naming every drifted file when the committed stubs differ from the ``.proto``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["PROTO_ROOT", "STUB_DIR", "GENERATED_FILES", "StubError", "generate", "write_stubs", "check_stubs"]

_KVSTORE_DIR = Path(__file__).resolve().parent
REPO_ROOT = _KVSTORE_DIR.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = Path("kvrecall/kvstore/v1/kvstore.proto")
STUB_DIR = _KVSTORE_DIR / "v1"
GENERATED_FILES = ("kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py")


class StubError(RuntimeError):
    """The stubs could not be generated (missing grpcio-tools, missing .proto, protoc failure)."""


def generate(out_dir: Path) -> dict[str, bytes]:
    """Run protoc on the service's .proto and return the generated files' bytes by name.

    Parameters
    ----------
    out_dir : Path
        Empty scratch directory; protoc writes ``kvrecall/kvstore/v1/*`` under it.

    Returns
    -------
    dict[str, bytes]
        File name (see :data:`GENERATED_FILES`) to content.
    """
    proto = PROTO_ROOT / PROTO_FILE
    if not proto.is_file():
        raise StubError(f"proto file not found: {proto} (run from a source checkout)")
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise StubError("grpcio-tools is not installed; pip install 'kvrecall[test]'") from exc
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_FILE),
    ]
    # protoc resolves the file relative to the -I roots; run it from the proto root so paths stay relative.
    cwd = os.getcwd()
    try:
        os.chdir(PROTO_ROOT)
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise StubError(f"protoc failed with exit status {rc} on {proto}")
    produced = out_dir / PROTO_FILE.parent
    files = {}
    for name in GENERATED_FILES:
        path = produced / name
        if not path.is_file():
            raise StubError(f"protoc did not produce {name}")
        files[name] = path.read_bytes()
    return files


def write_stubs() -> list[Path]:
    """Regenerate the stubs and copy them into ``kvstore/v1/``; return the written paths."""
    with tempfile.TemporaryDirectory(prefix="kvrecall-stubs-") as tmp:
        files = generate(Path(tmp))
    written = []
    for name, content in files.items():
        target = STUB_DIR / name
        target.write_bytes(content)
        written.append(target)
    return written


def check_stubs() -> list[str]:
    """Return the names of committed stub files that differ from freshly generated ones (empty: in sync)."""
    with tempfile.TemporaryDirectory(prefix="kvrecall-stubs-") as tmp:
        files = generate(Path(tmp))
    drifted = []
    for name, content in files.items():
        target = STUB_DIR / name
        if not target.is_file() or target.read_bytes() != content:
            drifted.append(str(target.relative_to(REPO_ROOT)))
    return drifted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvrecall.kvstore.stubs", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate the stubs into kvstore/v1/")
    mode.add_argument("--check", action="store_true", help="fail if the committed stubs differ from the .proto")
    args = parser.parse_args(argv)
    try:
        if args.write:
            for path in write_stubs():
                print(f"wrote {path.relative_to(REPO_ROOT)}")
            return 0
        drifted = check_stubs()
    except StubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if drifted:
        for name in drifted:
            print(f"stub drift: {name} differs from what {PROTO_FILE} generates; run `make stubs`", file=sys.stderr)
        return 1
    print("stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
