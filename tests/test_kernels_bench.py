"""The kernel bench's GPU code path runs end to end on tiny shapes under the interpreter (no figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_path_smoke_run():
    env = dict(os.environ, TRITON_INTERPRET="1") if not _cuda() else dict(os.environ)
    run = subprocess.run([sys.executable, "bench/kernels.py", "--smoke"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "smoke run of the GPU code path passed" in run.stdout


def test_bench_refuses_json_for_smoke_runs(tmp_path, capsys):
    import importlib.util

    import pytest

    spec = importlib.util.spec_from_file_location("kernels_bench", REPO / "bench" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["kernels_bench"] = bench  # dataclasses look their module up while the class is created
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--json", str(tmp_path / "x.json")])
    assert "no figures" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
