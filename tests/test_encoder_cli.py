"""``kvrecall encode-demo``: real model, real text, the printed table."""

from __future__ import annotations

import re

import numpy as np

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
    capsys.readouterr()
    assert main(["encode-demo", "--model", str(stories_path), "--texts", str(texts_path), "--level", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("encode-demo: unknown --level 'nope'") and "\n" not in err  # one line, no traceback
    assert main(["encode-demo", "--model", str(stories_path), "--texts", str(texts_path),
                 "--profile", str(tmp_path / "missing")]) == 2
    assert "codec profile not found" in capsys.readouterr().err


def test_calibrate_codec_bad_input_exits_2_with_one_line(stories_path, texts_path, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    base = ["calibrate-codec", "--model", str(stories_path), "--texts", str(texts_path / "gutenberg"), "--out", str(out)]
    assert main(base + ["--level", "ultra"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calibrate-codec: unknown --level 'ultra'") and "\n" not in err
    assert main(base + ["--max-tokens", "0"]) == 2
    assert "--max-tokens must be >= 2" in capsys.readouterr().err
    assert main(["calibrate-codec", "--model", str(tmp_path / "nope"), "--texts", str(texts_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not out.exists()


def test_calibrate_codec_says_when_texts_run_short(stories_path, texts_path, tmp_path, capsys):
    one = tmp_path / "texts"
    one.mkdir()
    (one / "a.txt").write_text("Once upon a time there was a little dog. " * 20)
    out = tmp_path / "p.safetensors"
    assert main(["calibrate-codec", "--model", str(stories_path), "--texts", str(one), "--out", str(out),
                 "--max-tokens", "5000"]) == 0
    err = capsys.readouterr().err
    assert "supply only" in err and "of the 5000 requested tokens" in err
    assert out.is_file()


def test_calibrate_codec_sensitivity_allocation(stories_path, texts_path, tmp_path, capsys):
    from kvrecall.encoder import CodecProfile

    out = tmp_path / "p.safetensors"
    assert main(["calibrate-codec", "--model", str(stories_path), "--texts", str(texts_path / "gutenberg"),
                 "--out", str(out), "--max-tokens", "300", "--allocation", "sensitivity"]) == 0
    p = CodecProfile.load(out)
    assert p.info["allocation"] == "sensitivity"
    scales = np.array(p.info["group_scales"])
    assert scales.shape == (p.num_layers, 2) and abs(np.log(scales).mean()) < 1e-4
    assert not np.allclose(scales, scales[0, 0])  # measured, not uniform
