"""The sub-packages import only downward: none of them pulls in kvrecall's integration layer.

Each sub-package (and every one of its modules) is imported in a fresh interpreter; afterwards no module of the
integration layer may be in ``sys.modules``. The bottom layer (``kvrecall.models``, ``kvrecall.model_store``,
``kvrecall.defaults``) is allowed.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"kvrecall.encoder": "encoder", "kvrecall.kvstore": "kvstore", "kvrecall.retriever": "retriever",
               "kvrecall.kernels": "kernels"}
BOTTOM = {"kvrecall", "kvrecall.models", "kvrecall.model_store", "kvrecall.defaults"}
# Modules that need a GPU toolchain or are command-line entry points, imported by other tests instead.
SKIP = {"kvrecall.kvstore.v1", "kvrecall.kernels.compile_check"}


def _modules(package: str, folder: str) -> list[str]:
    names = [package]
    for info in pkgutil.walk_packages([str(REPO / folder)], prefix=package + "."):
        if not any(info.name == s or info.name.startswith(s + ".") for s in SKIP) and "._" not in info.name:
            names.append(info.name)
    return names


@pytest.mark.parametrize("package", sorted(SUBPACKAGES))
def test_subpackage_never_imports_the_integration_layer(package):
    modules = _modules(package, SUBPACKAGES[package])
    assert len(modules) > 2
    probe = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'kvrecall' or m.startswith('kvrecall.'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    sub = tuple(SUBPACKAGES)
    upward = [m for m in loaded if m not in BOTTOM and not m.startswith(sub)]
    assert upward == [], f"{package} imported integration modules: {upward}"


def test_the_bottom_layer_imports_nothing_above_it():
    probe = ("import json, sys, kvrecall.models, kvrecall.model_store, kvrecall.defaults\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('kvrecall'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert set(json.loads(out.stdout)) <= BOTTOM


def test_integration_names_are_exported_lazily():
    probe = ("import json, sys, kvrecall\n"
             "before = sorted(m for m in sys.modules if m.startswith('kvrecall'))\n"
             "cc = kvrecall.ContextCache\n"
             "print(json.dumps([before, cc.__module__]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    before, module = json.loads(out.stdout)
    assert before == ["kvrecall"] and module == "kvrecall.context_cache"
