"""Shared fixtures: paths to the real assets in ../shared (overridable by environment variables)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU. The variable is read when a kernel is
# decorated, so it must be set before any test module imports kvrecall.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVRECALL_SHARED", REPO.parent / "shared"))
STORIES = Path(os.environ.get("KVRECALL_MODEL", SHARED / "models" / "stories260K"))
HD64 = SHARED / "models" / "fixture-hd64"
TEXTS = Path(os.environ.get("KVRECALL_TEXTS", SHARED / "data" / "texts"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared asset missing: {path} (CI provides ../shared)")
    return path


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return _need(STORIES)


@pytest.fixture(scope="session")
def hd64_path() -> Path:
    return _need(HD64)


@pytest.fixture(scope="session")
def texts_path() -> Path:
    return _need(TEXTS)


@pytest.fixture(scope="session")
def stories(stories_path):
    """(model, tokenizer) of stories260K, loaded once per session."""
    from kvrecall.models import load_model

    return load_model(stories_path)


@pytest.fixture(scope="session")
def hd64(hd64_path):
    """(model, tokenizer) of fixture-hd64, loaded once per session."""
    from kvrecall.models import load_model

    return load_model(hd64_path)


@pytest.fixture(scope="session")
def sotu_text(texts_path) -> str:
    return (texts_path / "state_union" / "1945-Truman.txt").read_text()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct by name (the ``models`` extra; converted once per machine)."""
    from kvrecall.models import load_model

    return load_model("smollm2-135m")
