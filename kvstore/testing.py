"""Helpers for tests and benchmarks: free ports, a throwaway redis-server, a kvstore server subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["free_port", "RedisProcess", "ServerProcess"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """``redis-server`` on a free loopback port with persistence off; :meth:`stop`/:meth:`start` to cut it."""

    def __init__(self, port: int | None = None, binary: str | None = None, cluster: bool = False) -> None:
        self.binary = binary or shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server not found on PATH")
        self.port = port or free_port()
        self.cluster = cluster
        self.workdir = tempfile.mkdtemp(prefix="kvrecall-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        import redis

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--protected-mode", "no", "--dir", self.workdir]
        if self.cluster:
            # The cluster bus defaults to port + 10000, invalid for ports above 55535: give it its own free port.
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-port", str(free_port())]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        if self.cluster:  # a one-node cluster owning every slot
            if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("one-node redis cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess:
    """``python -m kvrecall.cli serve`` in a subprocess on a free port; waits for its ``ready`` line.

    ``args`` are extra CLI arguments; ``env`` extra environment variables. Output lines are kept in
    :attr:`lines`. With ``config`` (a dict of :class:`~kvrecall.kvstore.server.ServerConfig` fields) the server
    runs through ``python -m kvrecall.kvstore.testing`` instead, for settings the CLI does not offer.
    """

    def __init__(self, args: list[str] | None = None, env: dict[str, str] | None = None,
                 port: int | None = None, config: dict | None = None) -> None:
        self.port = port or free_port()
        self.args = list(args or [])
        self.config = config  # ServerConfig fields as JSON: run `python -m kvrecall.kvstore.testing` instead
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "kvrecall.cli", "serve", "--port", str(self.port), *self.args]
        if self.config is not None:
            import json

            cmd = [sys.executable, "-m", "kvrecall.kvstore.testing", json.dumps({**self.config, "port": self.port})]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("kvstore server did not become ready:\n" + "".join(self.lines))
        if self.proc.poll() is not None:
            raise RuntimeError("kvstore server exited:\n" + "".join(self.lines))
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("kvrecall serve: ready"):
                self._ready.set()
        self._ready.set()  # exited: unblock start()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL (``kill -9``) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


def _serve_from_json(text: str) -> None:
    """``python -m kvrecall.kvstore.testing '{"port": 0, "disk_dir": ...}'``: serve a ServerConfig given as JSON."""
    import json
    import logging

    from kvrecall.kvstore.server import ServerConfig, serve

    fields = json.loads(text)
    logging.basicConfig(level=fields.pop("log_level", "WARNING"))
    serve(ServerConfig(**fields))


if __name__ == "__main__":
    _serve_from_json(sys.argv[1])
