"""Every subcommand checks its input up front: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvrecall.cli import build_parser, main


def _subcommands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices


def _options(name: str) -> set[str]:
    return {opt for action in _subcommands()[name]._actions for opt in action.option_strings}


MODEL_COMMANDS = [n for n in _subcommands() if "--model" in _options(n)]


def _required_args(name: str, tmp_path) -> list[str]:
    """Plausible values for the subcommand's other path arguments, so only the tested argument is wrong."""
    args = []
    opts = _options(name)
    if "--texts" in opts:
        args += ["--texts", str(tmp_path)]
    if "--out" in opts:
        args += ["--out", str(tmp_path / "out.bin")]
    return args


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_unknown_model_is_a_one_line_error(name, tmp_path, capsys):
    assert main([name, "--model", str(tmp_path / "no-such-model"), *_required_args(name, tmp_path)]) == 2
    assert "no-such-model" in _one_line_error(capsys)


@pytest.mark.parametrize("name", [n for n in _subcommands() if "--level" in _options(n)])
def test_unknown_codec_level_is_rejected_before_any_work(name, tmp_path, capsys):
    argv = [name, "--model", "smollm2-135m", "--level", "no-such-level", *_required_args(name, tmp_path)]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own choices check
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "no-such-level" in err and "Traceback" not in err


def test_bad_byte_size_for_serve_is_a_one_line_error(capsys):
    assert main(["serve", "--ram-bytes", "12 parsecs", "--port", "0"]) == 2
    assert "parsecs" in _one_line_error(capsys)


def test_a_subprocess_sees_exit_status_2_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kvrecall.cli", "encode-demo", "--model", str(tmp_path / "none"),
                          "--texts", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.strip()
