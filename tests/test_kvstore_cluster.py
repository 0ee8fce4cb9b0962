"""The Redis tier on a real three-master Redis Cluster on loopback: objects spread over the masters, one master
killed mid-run, what survives is still read, and no wrong byte is ever served."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kvrecall.kvstore import BackgroundServer, KVStoreClient, ServerConfig

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
pytestmark = pytest.mark.skipif(REDIS_SERVER is None or REDIS_CLI is None,
                                reason="redis-server and redis-cli are needed for a Redis Cluster")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_ports(n: int) -> list[int]:
    """``n`` ports above 20000 whose cluster-bus ports (port + 10000, below 65536) are free too."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 55536 - n)
        ports = list(range(base, base + n))
        if all(_free(p) and _free(p + 10000) for p in ports):
            return ports
    raise RuntimeError("no free ports for a Redis Cluster")


class Cluster:
    """Three ``redis-server --cluster-enabled yes`` masters joined by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.ports = _pick_ports(3)
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self) -> Cluster:
        import redis

        for port in self.ports:
            self.procs[port] = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", f"nodes-{port}.conf", "--cluster-node-timeout", "1000",
                 "--cluster-require-full-coverage", "no", "--save", "", "--appendonly", "no",
                 "--protected-mode", "no", "--dir", str(self.workdir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            self._wait(lambda port=port: redis.Redis(port=port, socket_timeout=1).ping())
        subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        for port in self.ports:
            self._wait(lambda port=port: b"cluster_state:ok" in redis.Redis(port=port).execute_command(
                "CLUSTER", "INFO") and len(redis.Redis(port=port).execute_command("CLUSTER", "SLOTS")) == 3)
        return self

    @staticmethod
    def _wait(check, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return
            except Exception:  # not up yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not come up")
            time.sleep(0.1)

    def owner(self, redis_key: bytes) -> int:
        """Port of the master that owns ``redis_key``'s slot."""
        import redis
        from redis.crc import key_slot

        slot = key_slot(redis_key)
        alive = next(p for p in self.ports if self.procs[p].poll() is None)
        for start, end, master, *_ in redis.Redis(port=alive).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise KeyError(slot)

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture()
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c.start()
    finally:
        c.stop()


def test_three_master_cluster_survives_a_killed_master_without_serving_wrong_bytes(tmp_path, cluster):
    url = f"redis://127.0.0.1:{cluster.ports[0]}/0"
    common = dict(port=0, redis_url=url, redis_cluster=True, redis_part_bytes=64 * 1024, redis_timeout_s=1.0)
    writer_cfg = ServerConfig(disk_dir=tmp_path / "writer", ram_bytes=64 << 20, disk_bytes=128 << 20, **common)
    reader_cfg = ServerConfig(disk_dir=None, ram_bytes=0, **common)  # Redis only: every Get reads the cluster
    rng = random.Random(3)
    objects = {b"obj/%d" % i: os.urandom(rng.choice([1, 1000, 70_000, 200_000, 300_000])) for i in range(30)}
    with BackgroundServer(writer_cfg) as writer, BackgroundServer(reader_cfg) as reader:
        redis_tier = reader.server.store.redis
        owners = {key: cluster.owner(redis_tier._meta_key(key)) for key in objects}
        assert set(owners.values()) == set(cluster.ports), "objects did not spread over all three masters"
        with KVStoreClient(writer.target, retries=0) as w, KVStoreClient(reader.target, retries=0, timeout_s=10) as r:
            for key, blob in objects.items():
                assert w.put(key, blob) == ["ram", "disk", "redis"]
            for key, blob in objects.items():
                assert r.get(key) == blob
            victim = cluster.ports[1]
            cluster.kill(victim)  # mid-run: no replica takes over its slots
            survivors = {k for k, port in owners.items() if port != victim}
            served: set[bytes] = set()
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and served != survivors:
                for key, blob in objects.items():
                    got = r.get(key)
                    assert got is None or got == blob, "wrong bytes served"
                    if got is not None:
                        served.add(key)
                        assert key in survivors, "served an object whose master is dead"
                time.sleep(0.2)
            assert served == survivors, f"{len(survivors - served)} objects on live masters were not read"
            present = r.exists(list(objects)).present
            assert [p for k, p in zip(objects, present) if k in survivors] == [True] * len(survivors)
            # the writer still stores into the surviving slots (and keeps serving all from its own tiers)
            tiers = w.put(b"after/0", b"late")
            assert "ram" in tiers and "disk" in tiers
            assert all(w.get(key) == blob for key, blob in objects.items())
            stats = {t.name: t for t in r.stats().tiers}
            assert stats["redis"].errors >= 1
