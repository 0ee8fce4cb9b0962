"""`pip install .` and `pip install -e .` both expose every folder as ``kvrecall.<folder>`` from outside the repo."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["kvrecall", "kvrecall.encoder", "kvrecall.kvstore", "kvrecall.retriever", "kvrecall.kernels"]


def _fresh_env(root: Path) -> Path:
    """A bare venv that sees this environment's dependencies (not its kvrecall) through a .pth file."""
    venv.EnvBuilder(with_pip=False).create(root)
    py = root / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Every site directory of this interpreter: the venv's own and, with --system-site-packages, the system's.
    # In sys.path order, so the venv's packages (setuptools among them) win over the system's.
    deps = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    deps += [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (Path(purelib) / "deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    return py


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_install_imports_every_subpackage_from_outside(tmp_path, editable):
    py = _fresh_env(tmp_path / "env")
    cmd = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    cmd += ["-e", str(REPO)] if editable else [str(REPO)]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    probe = "import importlib,json;print(json.dumps({m: importlib.import_module(m).__file__ for m in %r}))" % SUBPACKAGES
    out = subprocess.run([py, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    files = json.loads(out.stdout)
    for mod, file in files.items():
        inside_repo = Path(file).resolve().is_relative_to(REPO)
        assert inside_repo == editable, f"{mod} imported from {file}"
    assert files["kvrecall.encoder"].endswith(("encoder/__init__.py"))
    entry = tmp_path / "env" / "bin" / "kvrecall"
    assert entry.exists()


@pytest.mark.slow
def test_strict_editable_install_is_followed_by_type_checkers(tmp_path):
    """The Makefile's strict editable mode: mypy resolves kvrecall.<folder> and reads kvrecall's py.typed."""
    py = _fresh_env(tmp_path / "env")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--config-settings", "editable_mode=strict", "-e", str(REPO)],
                   check=True, cwd=tmp_path, capture_output=True)
    probe = tmp_path / "probe.py"
    probe.write_text("from kvrecall.encoder import encode\nfrom kvrecall.models import load_model\n"
                     "from kvrecall.retriever import RetrieverProfile\nimport kvrecall.no_such_module\n")
    out = subprocess.run([py, "-m", "mypy", "--follow-imports=skip", "--no-incremental", str(probe)],
                         cwd=tmp_path, capture_output=True, text=True)
    errors = [line for line in out.stdout.splitlines() if "error:" in line]
    # Exactly the one import that does not exist is reported: the real sub-packages are found.
    assert len(errors) == 1 and "kvrecall.no_such_module" in errors[0], out.stdout
    assert (REPO / "kvrecall" / "py.typed").is_file()
