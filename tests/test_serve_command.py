"""`kvrecall serve` turns its options into the server's configuration, secrets kept off the command line."""

from __future__ import annotations

from kvrecall.cli import build_parser
from kvrecall.commands.serve import build_config


def _config(argv: list[str]):
    return build_config(build_parser().parse_args(["serve", *argv]))


def test_redis_url_from_a_file_or_the_environment(tmp_path, monkeypatch):
    secret = tmp_path / "redis-url"
    secret.write_text("redis://:hunter2@127.0.0.1:6399/0\n")
    cfg = _config(["--redis-url-file", str(secret)])
    assert cfg.redis_url == "redis://:hunter2@127.0.0.1:6399/0"
    assert "hunter2" not in repr(cfg)
    monkeypatch.setenv("KVRECALL_REDIS_URL", "redis://:hunter3@127.0.0.1:6399/0")
    cfg = _config([])
    assert cfg.redis_url == "redis://:hunter3@127.0.0.1:6399/0" and "hunter3" not in repr(cfg)
    assert _config(["--redis-url", "redis://127.0.0.1:1/0"]).redis_url == "redis://127.0.0.1:1/0"


def test_durability_and_idle_options_reach_the_server(tmp_path):
    cfg = _config(["--require-disk", "--put-idle-timeout", "2.5", "--disk-dir", str(tmp_path)])
    assert cfg.require_disk and not cfg.disk_write_behind
    assert _config(["--disk-write-behind", "--disk-dir", str(tmp_path)]).disk_write_behind
    assert cfg.limits.put_idle_timeout_s == 2.5 and str(cfg.disk_dir) == str(tmp_path)
    default = _config([])
    assert not default.require_disk and default.disk_dir is not None  # the command keeps its disk tier
