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

from kvrecall import defaults
from kvrecall.kvstore.auth import BearerTokenInterceptor, server_credentials
from kvrecall.kvstore.limits import Limits
from kvrecall.kvstore.metrics import Metrics
from kvrecall.kvstore.secrets import resolve_url
from kvrecall.kvstore.service import SERVICE_NAME, KVStoreService
from kvrecall.kvstore.store import TieredStore
from kvrecall.kvstore.tiers_disk import DiskTier
from kvrecall.kvstore.tiers_ram import RamTier
from kvrecall.kvstore.tiers_redis import RedisTier
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

__all__ = ["ServerConfig", "KVStoreServer", "BackgroundServer", "serve", "default_disk_dir", "TIER_HEALTH_PREFIX"]

log = logging.getLogger("kvrecall.kvstore.server")
# Health service names of single tiers: "kvrecall.kvstore.tier.disk", "kvrecall.kvstore.tier.redis", ...
TIER_HEALTH_PREFIX = "kvrecall.kvstore.tier."
_TIER_POLL_S = 0.25
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _HealthServicer(health.aio.HealthServicer):
    """The standard health servicer whose Watch streams end when the server shuts down (after NOT_SERVING)."""

    def __init__(self) -> None:
        super().__init__()
        self._watches: set[asyncio.Task] = set()
        self._closing = False

    async def Watch(self, request, context) -> None:
        if self._closing:
            return
        task = asyncio.ensure_future(super().Watch(request, context))
        self._watches.add(task)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            if not self._closing:
                raise
        finally:
            self._watches.discard(task)

    async def end_watches(self) -> None:
        """End every Watch stream (they have been told NOT_SERVING), so they do not hold up shutdown."""
        self._closing = True
        await asyncio.sleep(0)  # let the NOT_SERVING updates be written first
        for task in list(self._watches):
            task.cancel()
        if self._watches:
            await asyncio.gather(*self._watches, return_exceptions=True)


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

    A tier is disabled by a zero budget (``ram_bytes``/``disk_bytes``) or, for disk, ``disk_dir=None`` (the
    default: an in-process ``ServerConfig()`` never writes into the user's home; ``kvrecall serve`` passes
    :func:`default_disk_dir`);
    Redis is used only when ``redis_url`` is set. ``port=0`` picks a free port (see ``KVStoreServer.port``).

    ``redis_url`` may be ``env:NAME`` (read from environment variable ``NAME``) or ``file:PATH`` (the file's
    content), so a password need not appear on a command line; ``redis_url_file`` is the same as
    ``redis_url="file:PATH"``. The URL and the token never appear in ``repr`` or in logs.

    Durability of an acknowledged Put (``require_disk`` False, the default): it is in every tier listed in the
    Put response's ``tiers``; when the disk cannot take it (full, failing, no room in the budget) the Put is
    still acknowledged with the tiers that did, and the disk shows as down in Stats, metrics and health. With
    ``require_disk`` the Put fails (RESOURCE_EXHAUSTED) unless the disk holds it: with ``disk_fsync`` (default)
    it then survives a power loss, without it a crash of the process. With ``disk_write_behind`` a Put is
    acknowledged once in RAM (and Redis) and written to disk in the background: as durable as redis-server
    without persistence until the write lands (a crash loses it), never torn.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    ram_bytes: int = 1 << 30
    disk_dir: str | Path | None = None  # in-process: no disk tier unless given; `kvrecall serve` uses default_disk_dir()
    disk_bytes: int = 10 << 30
    disk_fsync: bool = True
    redis_url: str | None = field(default=None, repr=False)
    redis_url_file: str | Path | None = None
    redis_cluster: bool = False
    redis_part_bytes: int = 8 << 20
    redis_timeout_s: float = 2.0
    limits: Limits = field(default_factory=Limits)
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None
    token: str | None = field(default=None, repr=False)
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    grace_s: float = defaults.SERVER_GRACE_S
    drain_s: float = 0.0
    require_disk: bool = False
    disk_write_behind: bool = False

    def __post_init__(self) -> None:
        if self.redis_url_file is not None:
            if self.redis_url is not None:
                raise ValueError("give the Redis URL either as redis_url or as redis_url_file, not both")
            self.redis_url = f"file:{self.redis_url_file}"
        if self.redis_url is not None:
            self.redis_url = resolve_url(self.redis_url)
        if self.require_disk and (self.disk_dir is None or self.disk_bytes == 0):
            raise ValueError("require_disk needs a disk tier (disk_dir and a non-zero disk_bytes)")
        if self.disk_write_behind and (self.require_disk or self.disk_dir is None or self.disk_bytes == 0):
            raise ValueError("disk_write_behind needs a disk tier and cannot be combined with require_disk")
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
        self.store = TieredStore(ram, disk, redis, require_disk=config.require_disk,
                                 write_behind=config.disk_write_behind,
                                 write_behind_bytes=config.limits.max_inflight_put_bytes)
        self.metrics = Metrics(self.store)
        self.service = KVStoreService(self.store, config.limits, self.metrics)
        self.health = _HealthServicer()
        self._tier_health: dict[str, bool] = {}
        self._tier_task: asyncio.Task | None = None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_httpd = None
        self._open_task: asyncio.Task | None = None
        self.metrics_port: int | None = None

    async def start(self, wait_ready: bool = True) -> None:
        """Check the TLS files, lock the disk directory, bind, serve health (NOT_SERVING), open the tiers,
        then report SERVING.

        Raises
        ------
        AuthError
            A TLS file cannot be read, or the key does not match the certificate.
        DiskStoreError
            The disk directory is locked by another server or cannot be created.
        OSError
            The port (or the metrics port) cannot be bound; the message names it.
        """
        cfg = self.config
        creds = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca) if cfg.tls_cert is not None else None
        self.store.lock()  # before binding: a second server on the same directory fails before "listening"
        try:
            await self._bind(creds, wait_ready)
        except BaseException:
            if self.store.disk is not None:
                self.store.disk.close()  # release the directory lock
            raise

    async def _bind(self, creds, wait_ready: bool) -> None:
        cfg = self.config
        interceptors = [BearerTokenInterceptor(cfg.token)] if cfg.token else []
        options = cfg.limits.grpc_options() + [("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(interceptors=interceptors, options=options)
        self._server.add_generic_rpc_handlers((self.service.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = (pb.DESCRIPTOR.services_by_name["KVStore"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._server)
        for service in ("", SERVICE_NAME, *(TIER_HEALTH_PREFIX + t.name for t in self.store.tiers())):
            await self.health.set(service, _NOT_SERVING)
        address = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
        try:
            if creds is not None:
                self.port = self._server.add_secure_port(address, creds)
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports bind failures this way
            self._server = None
            raise OSError(f"cannot listen on {address}: address in use or not available") from exc
        if not _is_loopback(cfg.host) and (cfg.token is None or cfg.tls_cert is None):
            log.warning("kvstore listens on %s without %s; anyone who can reach it can read and write objects",
                        address, "a token" if cfg.token is None else "TLS (the token travels in clear text)")
        await self._server.start()
        try:
            if cfg.metrics_port is not None:
                from prometheus_client import start_http_server

                try:
                    self._metrics_httpd, _ = start_http_server(cfg.metrics_port, cfg.metrics_host,
                                                               registry=self.metrics.registry)
                except OSError as exc:
                    raise OSError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: "
                                  f"{exc.strerror or exc}") from exc
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
            await self.health.set(service, _SERVING)
        await self._sync_tier_health()
        self._tier_task = asyncio.get_running_loop().create_task(self._watch_tiers())
        tiers = ", ".join(t.name for t in self.store.tiers())
        log.info("kvstore serving on %s:%s (tiers: %s)", self.config.host, self.port, tiers)

    async def _sync_tier_health(self) -> None:
        """Mirror each tier's availability into its health service; with ``require_disk`` the disk's too into
        the KVStore service (a Put cannot succeed while the disk is down)."""
        for tier in self.store.tiers():
            up = bool(getattr(tier, "available", True))
            if self._tier_health.get(tier.name) != up:
                self._tier_health[tier.name] = up
                await self.health.set(TIER_HEALTH_PREFIX + tier.name, _SERVING if up else _NOT_SERVING)
                if self.config.require_disk and tier is self.store.disk:
                    for service in ("", SERVICE_NAME):
                        await self.health.set(service, _SERVING if up else _NOT_SERVING)

    async def _watch_tiers(self) -> None:
        disk = self.store.disk
        polls = 0
        while True:
            await asyncio.sleep(_TIER_POLL_S)
            polls += 1
            if disk is not None and not disk.available and polls % 4 == 0:  # once a second while it is down
                await asyncio.to_thread(disk.probe)
            await self._sync_tier_health()

    async def wait_ready(self) -> None:
        """Wait until the tiers are open (re-raises an error from opening them)."""
        if self._open_task is None:
            raise RuntimeError("server not started")
        await asyncio.shield(self._open_task)

    async def stop(self, grace: float | None = None, drain: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, drain, refuse new calls, finish calls in flight, close the tiers.

        Health Watch streams are ended and Put streams idle for 0.5 s are refused (UNAVAILABLE), so an idle
        client does not hold the server for the whole grace period.
        """
        if self._server is None:
            return
        if self._tier_task is not None:
            self._tier_task.cancel()
        await self.health.enter_graceful_shutdown()
        drain = self.config.drain_s if drain is None else drain
        if drain > 0:
            await asyncio.sleep(drain)
        self.service.begin_shutdown()
        await self.health.end_watches()
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
    """Run a kvstore server in the foreground until SIGTERM/SIGINT, then shut down gracefully.

    With no ``config``: the command line's defaults (RAM, and disk under :func:`default_disk_dir`).
    """
    asyncio.run(_serve_until_signal(config or ServerConfig(disk_dir=default_disk_dir())))
