"""The kvstore server: grpc.aio server with health checking, reflection, metrics, auth and graceful shutdown.

Lifecycle: :meth:`KVStoreServer.start` binds the port and reports health NOT_SERVING; the disk index is rebuilt
and Redis probed; then health turns SERVING and KVStore calls are accepted (before that they get UNAVAILABLE).
:meth:`KVStoreServer.stop` turns health NOT_SERVING, refuses new calls, lets calls in flight finish within the
grace period, waits for background promotions and releases the tiers. :func:`serve` runs a server until SIGTERM
or SIGINT.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvrecall.kvstore.auth import BearerTokenInterceptor, server_credentials
from kvrecall.kvstore.limits import Limits
from kvrecall.kvstore.metrics import Metrics
from kvrecall.kvstore.service import SERVICE_NAME, KVStoreService
from kvrecall.kvstore.store import TieredStore
from kvrecall.kvstore.tiers_disk import DiskTier
from kvrecall.kvstore.tiers_ram import RamTier
from kvrecall.kvstore.tiers_redis import RedisTier
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

__all__ = ["ServerConfig", "KVStoreServer", "BackgroundServer", "serve", "default_disk_dir"]

log = logging.getLogger("kvrecall.kvstore.server")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def default_disk_dir() -> Path:
    """``$XDG_CACHE_HOME/kvrecall/store``, i.e. ``~/.cache/kvrecall/store`` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvrecall" / "store"


@dataclass
class ServerConfig:
    """Everything a kvstore server needs; defaults make a working local server.

    At shutdown the server reports NOT_SERVING and keeps serving for ``drain_s`` seconds (so load balancers
    watching health stop sending new work), then refuses new calls and gives calls in flight ``grace_s``.

    A tier is disabled by a zero budget (``ram_bytes``/``disk_bytes``) or, for disk, ``disk_dir=None``;
    Redis is used only when ``redis_url`` is set. ``port=0`` picks a free port (see ``KVStoreServer.port``).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    ram_bytes: int = 1 << 30
    disk_dir: str | Path | None = field(default_factory=default_disk_dir)
    disk_bytes: int = 10 << 30
    disk_fsync: bool = True
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_part_bytes: int = 8 << 20
    redis_timeout_s: float = 2.0
    limits: Limits = field(default_factory=Limits)
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None
    token: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    grace_s: float = 10.0
    drain_s: float = 0.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("client-certificate checking (tls_client_ca) needs TLS (tls_cert and tls_key)")
        for name in ("ram_bytes", "disk_bytes", "port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


class KVStoreServer:
    """One kvstore server in the current asyncio loop. ``await start()``, later ``await stop()``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        ram = RamTier(config.ram_bytes) if config.ram_bytes > 0 else None
        disk = (DiskTier(config.disk_dir, config.disk_bytes, fsync=config.disk_fsync)
                if config.disk_dir is not None and config.disk_bytes > 0 else None)
        redis = (RedisTier(config.redis_url, part_bytes=config.redis_part_bytes, timeout_s=config.redis_timeout_s,
                           cluster=config.redis_cluster)
                 if config.redis_url else None)
        self.store = TieredStore(ram, disk, redis)
        self.metrics = Metrics(self.store)
        self.service = KVStoreService(self.store, config.limits, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_httpd = None
        self._open_task: asyncio.Task | None = None
        self.metrics_port: int | None = None

    async def start(self, wait_ready: bool = True) -> None:
        """Bind, serve health (NOT_SERVING), open the tiers, then report SERVING."""
        cfg = self.config
        interceptors = [BearerTokenInterceptor(cfg.token)] if cfg.token else []
        options = cfg.limits.grpc_options() + [("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(interceptors=interceptors, options=options)
        self._server.add_generic_rpc_handlers((self.service.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = (pb.DESCRIPTOR.services_by_name["KVStore"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._server)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        try:
            if cfg.tls_cert is not None:
                creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports bind failures this way
            raise OSError(f"cannot listen on {address}: address in use or not available") from exc
        if not _is_loopback(cfg.host) and (cfg.token is None or cfg.tls_cert is None):
            log.warning("kvstore listens on %s without %s; anyone who can reach it can read and write objects",
                        address, "a token" if cfg.token is None else "TLS (the token travels in clear text)")
        await self._server.start()
        try:
            if cfg.metrics_port is not None:
                from prometheus_client import start_http_server

                self._metrics_httpd, _ = start_http_server(cfg.metrics_port, cfg.metrics_host,
                                                           registry=self.metrics.registry)
                self.metrics_port = self._metrics_httpd.server_port
            self._open_task = asyncio.get_running_loop().create_task(self._open())
            if wait_ready:
                await self.wait_ready()
        except BaseException:
            await self.stop(grace=0, drain=0)  # release the port, the metrics endpoint and the tiers
            raise

    async def _open(self) -> None:
        await self.store.open()
        self.service.ready = True
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        tiers = ", ".join(t.name for t in self.store.tiers())
        log.info("kvstore serving on %s:%s (tiers: %s)", self.config.host, self.port, tiers)

    async def wait_ready(self) -> None:
        """Wait until the tiers are open (re-raises an error from opening them)."""
        if self._open_task is None:
            raise RuntimeError("server not started")
        await asyncio.shield(self._open_task)

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, drain, refuse new calls, finish calls in flight, close the tiers."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        drain = self.config.drain_s if drain is None else drain
        if drain > 0:
            await asyncio.sleep(drain)
        await self._server.stop(self.config.grace_s if grace is None else grace)
        self.service.ready = False
        if self._open_task is not None and not self._open_task.done():
            self._open_task.cancel()
        await self.store.close()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        self._server = None
        log.info("kvstore on port %s stopped", self.port)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class BackgroundServer:
    """A :class:`KVStoreServer` on its own event loop in a daemon thread, for tests, benchmarks and embedding.

    ``with BackgroundServer(config) as srv: KVStoreClient(srv.target)``.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvstore-server", daemon=True)
        self._thread.start()
        self.server = KVStoreServer(config)
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=120)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def stop(self, grace: float = 1.0, drain: float = 0.0) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.server.stop(grace, drain), self.loop)
        future.result(timeout=grace + drain + 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def _serve_until_signal(config: ServerConfig) -> None:
    server = KVStoreServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start(wait_ready=False)
    print(f"kvrecall serve: listening on {config.host}:{server.port}", flush=True)
    ready = loop.create_task(server.wait_ready())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        stopped.cancel()
        await server.stop(0)
        raise ready.exception()
    if ready.done():
        print(f"kvrecall serve: ready (tiers: {', '.join(t.name for t in server.store.tiers())})", flush=True)
        await stopped
    else:
        ready.cancel()
    log.info("signal received; shutting down (drain %.1f s, grace %.1f s)", config.drain_s, config.grace_s)
    await server.stop()
    print("kvrecall serve: stopped", flush=True)


def serve(config: ServerConfig | None = None) -> None:
    """Run a kvstore server in the foreground until SIGTERM/SIGINT, then shut down gracefully."""
    asyncio.run(_serve_until_signal(config or ServerConfig()))
