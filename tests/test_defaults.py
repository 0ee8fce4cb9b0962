"""One home for defaults: the CLI and the library read the same values from kvrecall.defaults."""

from __future__ import annotations

import inspect

from kvrecall import defaults
from kvrecall.cli import build_parser


def _defaults_of(command: str) -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a.default for a in sub._actions}


def test_in_process_server_config_never_defaults_into_home():
    from kvrecall.kvstore.server import ServerConfig

    cfg = ServerConfig()
    assert cfg.disk_dir is None
    assert cfg.grace_s == defaults.SERVER_GRACE_S


def test_serve_command_and_server_share_defaults():
    cli = _defaults_of("serve")
    assert cli["host"] == defaults.SERVER_HOST and cli["port"] == defaults.SERVER_PORT
    assert cli["drain"] == defaults.SERVER_DRAIN_S and cli["grace"] == defaults.SERVER_GRACE_S


def test_retriever_calibration_defaults_to_the_measured_mode():
    from kvrecall.retriever import calibrate

    params = inspect.signature(calibrate).parameters
    assert params["rope_mode"].default == defaults.RETRIEVER_ROPE_MODE == "positional"
    assert params["bits"].default == defaults.RETRIEVER_BITS
    cli = _defaults_of("calibrate-retriever")
    assert cli["rope_mode"] == defaults.RETRIEVER_ROPE_MODE and cli["bits"] == defaults.RETRIEVER_BITS


def test_context_cache_and_key_chain_share_the_chunk_size():
    from kvrecall.context_cache import ContextCache
    from kvrecall.kvstore.keys import chunk_keys

    assert inspect.signature(ContextCache).parameters["chunk_tokens"].default == defaults.CHUNK_TOKENS
    assert inspect.signature(chunk_keys).parameters["chunk_tokens"].default == defaults.CHUNK_TOKENS


def test_codec_calibration_command_reads_the_codec_defaults():
    cli = _defaults_of("calibrate-codec")
    assert cli["max_tokens"] == defaults.CODEC_CALIBRATION_TOKENS
    assert cli["groups"] == defaults.CODEC_TABLE_GROUPS
