import subprocess
import sys

import pytest

from kvrecall.cli import build_parser, main
from kvrecall.config import ConfigError, parse_bytes


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 * 1024**3
    assert parse_bytes("100MB") == 100 * 10**6
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes(65536) == 65536
    for bad in ["", "-1", "4XB", "GiB", "1e9"]:
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_help_lists_every_subcommand_with_a_description():
    parser = build_parser()
    help_text = parser.format_help()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices, "no subcommands registered"
    for name, sub_parser in sub.choices.items():
        assert name in help_text
        assert sub_parser.description, f"subcommand {name} has no description"


def test_cli_entry_point_runs_in_a_subprocess():
    out = subprocess.run([sys.executable, "-m", "kvrecall.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: kvrecall" in out.stdout
    assert main([]) == 2
