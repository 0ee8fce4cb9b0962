"""``kvrecall encode-demo``: real model, real text, the printed table."""

from __future__ import annotations

import re

from kvrecall.cli import main


def test_encode_demo_calibrates_and_prints_table(stories_path, texts_path, capsys):
    rc = main(["encode-demo", "--model", str(stories_path), "--texts", str(texts_path / "state_union"),
               "--tokens", "96", "--cont", "16", "--calib-tokens", "600", "--level", "low"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "calibrated on" in out
    rows = [line for line in out.splitlines() if re.match(r"^low\b", line)]
    assert len(rows) == 2  # the profile row and the self-contained (no profile) row
    bits = float(rows[0].split()[2])
    assert 0.5 < bits < 8


def test_encode_demo_with_profile_file_and_bad_args(stories_path, texts_path, tmp_path, capsys):
    prof = tmp_path / "p.safetensors"
    assert main(["calibrate-codec", "--model", str(stories_path), "--texts", str(texts_path / "gutenberg"),
                 "--out", str(prof), "--max-tokens", "400"]) == 0
    capsys.readouterr()
    rc = main(["encode-demo", "--model", str(stories_path), "--texts", str(texts_path / "state_union"),
               "--tokens", "40", "--cont", "8", "--profile", str(prof), "--level", "high"])
    assert rc == 0
    assert "from " + str(prof) in capsys.readouterr().out
    assert main(["encode-demo", "--model", str(stories_path), "--texts", str(texts_path), "--level", "nope"]) == 1
    assert main(["encode-demo", "--model", str(stories_path), "--texts", str(texts_path),
                 "--profile", str(tmp_path / "missing")]) == 1
