"""``kvrecall serve``: run the gRPC KV store (RAM -> disk -> optional Redis) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

from kvrecall import defaults

DESCRIPTION = (
    "Run the kvrecall KV store: a gRPC service keeping encoded KV chunks in RAM (LRU), on disk (durable, LRU) "
    "and optionally in a Redis shared by several servers. With no options it listens on 127.0.0.1:50051 with "
    "1GiB of RAM and 10GiB under ~/.cache/kvrecall/store ($XDG_CACHE_HOME/kvrecall/store). Health checking, "
    "reflection and graceful shutdown on SIGTERM are built in. Byte sizes accept units (4GiB, 500MB, 65536)."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the gRPC KV store", description=DESCRIPTION)
    p.add_argument("--host", default=defaults.SERVER_HOST,
                   help=f"address to bind (default {defaults.SERVER_HOST}; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=defaults.SERVER_PORT,
                   help=f"port (default {defaults.SERVER_PORT}; 0 picks a free one)")
    p.add_argument("--ram-bytes", default="1GiB", help="RAM tier budget (default 1GiB; 0 disables the tier)")
    p.add_argument("--disk-dir", default=None,
                   help="disk tier directory (default $XDG_CACHE_HOME/kvrecall/store or ~/.cache/kvrecall/store)")
    p.add_argument("--disk-bytes", default="10GiB", help="disk tier budget (default 10GiB; 0 disables the tier)")
    p.add_argument("--require-disk", action="store_true",
                   help="fail a Put the disk tier cannot store (disk full, failing) instead of acknowledging it RAM-only")
    p.add_argument("--disk-write-behind", action="store_true",
                   help="acknowledge Puts from RAM and write the disk behind (a crash loses what is not written yet)")
    p.add_argument("--no-fsync", action="store_true",
                   help="skip fsync on disk writes (faster; a power loss may lose recent Puts, never tear them)")
    p.add_argument("--redis-url", default=None,
                   help="shared Redis tier, e.g. redis://127.0.0.1:6379/0; also env:NAME or file:PATH so a password "
                        "stays off the command line (default: $KVRECALL_REDIS_URL when set)")
    p.add_argument("--redis-url-file", default=None, help="file holding the Redis URL (the password stays out of ps)")
    p.add_argument("--redis-cluster", action="store_true",
                   help="--redis-url names a node of a Redis Cluster (keys are hash-tagged per object)")
    p.add_argument("--redis-part-bytes", default="8MiB", help="largest Redis value; bigger objects are split")
    p.add_argument("--tls-cert", default=None, help="PEM server certificate (enables TLS; needs --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA; clients must present a certificate it signed")
    p.add_argument("--token-file", default=None, help="file holding a bearer token every call but health must send")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    p.add_argument("--max-object-bytes", default="1GiB", help="largest object a Put may store (default 1GiB)")
    p.add_argument("--max-key-bytes", type=int, default=1024, help="longest key (default 1024, at most 65535)")
    p.add_argument("--put-idle-timeout", type=float, default=30.0,
                   help="seconds a Put stream may stay silent before it is ended (default 30)")
    p.add_argument("--max-message-bytes", default="4MiB",
                   help="largest gRPC message (default 4MiB); clients' chunk size must fit in it")
    p.add_argument("--chunk-bytes", default="1MiB", help="default Get chunk size (default 1MiB)")
    p.add_argument("--max-inflight-bytes", default="2GiB", help="bytes of Puts received at once (default 2GiB)")
    p.add_argument("--drain", type=float, default=defaults.SERVER_DRAIN_S,
                   help=f"seconds of NOT_SERVING health while still serving, at shutdown (default {defaults.SERVER_DRAIN_S:g})")
    p.add_argument("--grace", type=float, default=defaults.SERVER_GRACE_S,
                   help=f"seconds calls in flight get at shutdown (default {defaults.SERVER_GRACE_S:g})")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """Turn parsed arguments into a :class:`~kvrecall.kvstore.server.ServerConfig` (raises ConfigError/ValueError)."""
    import os

    from kvrecall.config import parse_bytes
    from kvrecall.kvstore.auth import load_token
    from kvrecall.kvstore.limits import Limits
    from kvrecall.kvstore.server import ServerConfig, default_disk_dir

    limits = Limits(
        max_key_bytes=args.max_key_bytes,
        max_object_bytes=parse_bytes(args.max_object_bytes),
        max_message_bytes=parse_bytes(args.max_message_bytes),
        chunk_bytes=parse_bytes(args.chunk_bytes),
        max_inflight_put_bytes=parse_bytes(args.max_inflight_bytes),
        put_idle_timeout_s=args.put_idle_timeout,
    )
    redis_url = args.redis_url
    if redis_url is None and args.redis_url_file is None:
        redis_url = os.environ.get("KVRECALL_REDIS_URL") or None
    return ServerConfig(
        host=args.host,
        port=args.port,
        ram_bytes=parse_bytes(args.ram_bytes),
        disk_dir=args.disk_dir if args.disk_dir is not None else default_disk_dir(),
        disk_bytes=parse_bytes(args.disk_bytes),
        disk_fsync=not args.no_fsync,
        redis_url=redis_url,
        redis_url_file=args.redis_url_file,
        require_disk=args.require_disk,
        disk_write_behind=args.disk_write_behind,
        redis_cluster=args.redis_cluster,
        redis_part_bytes=parse_bytes(args.redis_part_bytes),
        limits=limits,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        token=load_token(args.token_file) if args.token_file else None,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        grace_s=args.grace,
        drain_s=args.drain,
    )


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from kvrecall.config import ConfigError
    from kvrecall.kvstore.auth import AuthError
    from kvrecall.kvstore.server import serve
    from kvrecall.kvstore.tiers_disk import DiskStoreError

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(args)
        serve(config)
    except (ConfigError, AuthError, DiskStoreError, ValueError, OSError) as exc:
        print(f"kvrecall serve: error: {exc}", file=sys.stderr)
        return 2
    return 0
