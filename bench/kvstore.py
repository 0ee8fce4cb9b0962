"""Benchmark: kvstore Put/Get vs redis-server (redis-py SET/GET) vs in-process memcpy, side by side on loopback.

Run from the repository root::

    python bench/kvstore.py --quick --json bench/results/kvstore-quick.json

The kvstore server runs as a separate process (``python -m kvrecall.cli serve``) with a RAM tier and a disk
tier (fsync on: a Put is acknowledged only once durable) in a temporary directory; redis-server runs with
persistence off. Clients are threads of this process, each with its own channel/connection. Every Get is
checked byte for byte against the object that was stored, outside the timed region; the kvstore client also
checks the CRC-32 end to end inside it (the ``kvstore-nocrc`` rows switch that off to show its cost,
``kvstore-chunk=...`` rows sweep the chunk size, ``kvstore-aio`` rows read through the asyncio client (one event
loop, a task per client), ``kvstore-nofsync`` rows put to a second server started with ``--no-fsync`` and
``kvstore-writebehind`` rows to a third with ``disk_write_behind`` (acknowledged from RAM, disk written in the
background: the durability of redis-server without persistence until the write lands). Each kvstore row's
``x_redis`` is its GB/s over redis-py's for the same op, size and clients, in the same run. Latencies are per
call. Throughput with one client is object size / median latency, so a few outliers on a shared machine do not
swing it; with several clients it is all bytes moved / wall time of the run (``--verbose`` also prints the
wall-based figure of single-client rows). Rows: ``{"system", "op", "object_bytes", "clients", "GBps",
"x_redis", "p50_ms", "p99_ms", "errors"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

MiB = 1 << 20
VERBOSE = False


def start_kvstore(store_dir: Path, chunk_bytes: int, fsync: bool = True):
    """The kvstore server as a separate process (as deployed): RAM + disk tier, with fsync by default."""
    from kvrecall.kvstore.testing import ServerProcess

    args = ["--disk-dir", str(store_dir), "--ram-bytes", "2GiB", "--disk-bytes", "8GiB",
            "--chunk-bytes", str(chunk_bytes), "--max-message-bytes", str(max(4 * MiB, chunk_bytes + MiB)),
            "--log-level", "WARNING", "--drain", "0"] + ([] if fsync else ["--no-fsync"])
    srv = ServerProcess(args).start()
    return srv, srv.target


def start_kvstore_writebehind(store_dir: Path, chunk_bytes: int):
    """Like :func:`start_kvstore` with ``disk_write_behind`` (a ServerConfig setting the CLI does not expose)."""
    from kvrecall.kvstore.testing import ServerProcess

    srv = ServerProcess(config={"disk_dir": str(store_dir), "ram_bytes": 2 << 30, "disk_bytes": 8 << 30,
                                "drain_s": 0, "disk_write_behind": True}).start()
    return srv, srv.target


def start_redis() -> tuple[subprocess.Popen | None, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        return None, 0
    from kvrecall.kvstore.testing import free_port

    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--proto-max-bulk-len", "1gb"], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, port


def run_clients(n_clients: int, ops_per_client: int, op_fn, make_client, check=None
                ) -> tuple[float, list[float], int]:
    """Run ``op_fn(client, client_index, op_index)`` concurrently and ``check(result, ci, i)`` untimed after each.

    Returns the wall time of the whole run, all call latencies and the number of failed calls.
    """
    clients = [make_client() for _ in range(n_clients)]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(n_clients + 1)

    def worker(ci: int) -> None:
        local = []
        barrier.wait()
        for i in range(ops_per_client):
            t0 = time.perf_counter()
            try:
                result = op_fn(clients[ci], ci, i)
                failed = False
            except Exception as exc:  # counted, reported
                print(f"error: {exc!r}", file=sys.stderr)
                failed = True
            local.append(time.perf_counter() - t0)
            if not failed and check is not None:
                failed = not check(result, ci, i)
            if failed:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=worker, args=(ci,)) for ci in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in clients:
        close = getattr(c, "close", None)
        if close:
            close()
    return wall, latencies, errors[0]


def run_async_clients(target: str, n_clients: int, ops_per_client: int, key_of, check, chunk: int
                      ) -> tuple[float, list[float], int]:
    """Like :func:`run_clients` for Gets through :class:`AsyncKVStoreClient`: one event loop, a task per client."""
    import asyncio

    from kvrecall.kvstore import AsyncKVStoreClient

    async def main():
        clients = [AsyncKVStoreClient(target, chunk_bytes=chunk, max_message_bytes=max(4 * MiB, chunk + MiB))
                   for _ in range(n_clients)]
        for c in clients:  # connect before timing
            await c.exists([b"warm"])
        latencies: list[float] = []
        errors = 0

        async def worker(ci: int) -> None:
            nonlocal errors
            for i in range(ops_per_client):
                t0 = time.perf_counter()
                try:
                    result = await clients[ci].get(key_of(ci, i))
                    ok = True
                except Exception as exc:  # counted, reported
                    print(f"error: {exc!r}", file=sys.stderr)
                    ok = False
                latencies.append(time.perf_counter() - t0)
                if not (ok and check(result, ci, i)):
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(ci) for ci in range(n_clients)))
        wall = time.perf_counter() - t0
        for c in clients:
            await c.close()
        return wall, latencies, errors

    return asyncio.run(main())


def row(system, op, size, clients, wall, lat, errors, n_ops) -> dict:
    """One result row. GBps: one client, object size / median call latency (robust to a loaded machine's
    outliers); several clients, all bytes moved / wall time of the run (their aggregate)."""
    lat_ms = np.array(lat) * 1000
    p50 = float(np.percentile(lat_ms, 50))
    mean_based = size * n_ops / wall / 1e9
    if VERBOSE:
        print(f"  {system} {op} {size} x{clients}: wall-based {mean_based:.3f} GB/s", file=sys.stderr)
    gbps = size / (p50 / 1000) / 1e9 if clients == 1 else mean_based
    return {"system": system, "op": op, "object_bytes": size, "clients": clients,
            "GBps": round(gbps, 3), "p50_ms": round(p50, 3),
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 3), "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer operations (< 60 s)")
    ap.add_argument("--json", type=Path, default=None, help="write rows here (and a PNG plot beside it)")
    ap.add_argument("--sizes", default="1MiB,8MiB", help="object sizes")
    ap.add_argument("--clients", default="1,16", help="client counts")
    ap.add_argument("--chunk-bytes", default="1MiB", help="kvstore Put/Get chunk size (64KiB..1MiB)")
    ap.add_argument("--verbose", action="store_true", help="also print wall-based throughput per row")
    args = ap.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    load_at_start = os.getloadavg()[0]

    from kvrecall.config import parse_bytes
    from kvrecall.kvstore import KVStoreClient

    sizes = [parse_bytes(s) for s in args.sizes.split(",")]
    client_counts = [int(c) for c in args.clients.split(",")]
    chunk = parse_bytes(args.chunk_bytes)
    budget_bytes = 160 * MiB if args.quick else 768 * MiB  # bytes per (config): sets the op count

    rng = random.Random(0)
    n_objects = 4
    objects = {size: [rng.randbytes(size) for _ in range(n_objects)] for size in sizes}
    tmp = Path(tempfile.mkdtemp(prefix="kvstore-bench-"))
    kv_proc, target = start_kvstore(tmp / "store", chunk)
    nofsync_proc, nofsync_target = start_kvstore(tmp / "store-nofsync", chunk, fsync=False)
    behind_proc, behind_target = start_kvstore_writebehind(tmp / "store-behind", chunk)
    redis_proc, redis_port = start_redis()
    rows: list[dict] = []
    configs = [(s, c) for s in sizes for c in client_counts]
    try:
        import redis

        bar = tqdm(total=len(configs) * (5 if redis_proc else 3), desc="kvstore bench", file=sys.stderr)
        for size, n_clients in configs:
            ops = max(3, min(60, budget_bytes // size // n_clients))
            objs = objects[size]

            def kv_client(verify=True, chunk_bytes=chunk):
                return KVStoreClient(target, chunk_bytes=chunk_bytes, verify=verify,
                                     max_message_bytes=max(4 * MiB, chunk_bytes + MiB))

            def kv_put(c, ci, i, size=size, objs=objs):
                return c.put(b"bench/%d/%d/%d" % (size, ci, i % 8), objs[(ci + i) % n_objects])

            wall, lat, err = run_clients(n_clients, ops, kv_put, kv_client, check=lambda r, ci, i: "ram" in r)
            rows.append(row("kvstore", "put", size, n_clients, wall, lat, err, ops * n_clients))
            # the same Puts without fsync, and acknowledged before the disk write: what waiting for the disk costs
            for system, where in (("kvstore-nofsync", nofsync_target), ("kvstore-writebehind", behind_target)):
                wall, lat, err = run_clients(n_clients, ops, kv_put, lambda where=where: KVStoreClient(where),
                                             check=lambda r, ci, i: "ram" in r)
                rows.append(row(system, "put", size, n_clients, wall, lat, err, ops * n_clients))
            bar.update()
            with kv_client() as c:
                for j, obj in enumerate(objs):
                    c.put(b"bench/get/%d/%d" % (size, j), obj)

            def kv_get(c, ci, i, size=size):
                return c.get(b"bench/get/%d/%d" % (size, (ci + i) % n_objects))

            def same(result, ci, i, objs=objs):
                return result is not None and result == objs[(ci + i) % n_objects]

            variants = [("kvstore", {})]
            if size == 8 * MiB and n_clients == 1:
                variants.append(("kvstore-nocrc", {"verify": False}))
                variants += [(f"kvstore-chunk={cb // 1024}KiB", {"chunk_bytes": cb})
                             for cb in (64 * 1024, 256 * 1024) if cb != chunk]
            for system, kw in variants:
                wall, lat, err = run_clients(n_clients, ops, kv_get, lambda kw=kw: kv_client(**kw), check=same)
                rows.append(row(system, "get", size, n_clients, wall, lat, err, ops * n_clients))
            def get_key(ci, i, size=size):
                return b"bench/get/%d/%d" % (size, (ci + i) % n_objects)

            wall, lat, err = run_async_clients(target, n_clients, ops, get_key, same, chunk)
            rows.append(row("kvstore-aio", "get", size, n_clients, wall, lat, err, ops * n_clients))
            bar.update()

            if redis_proc is not None:
                def rd_client():
                    return redis.Redis(port=redis_port, socket_timeout=60)

                def rd_set(c, ci, i, size=size, objs=objs):
                    return c.set(b"bench/%d/%d/%d" % (size, ci, i % 8), objs[(ci + i) % n_objects])

                wall, lat, err = run_clients(n_clients, ops, rd_set, rd_client, check=lambda r, ci, i: bool(r))
                rows.append(row("redis-py", "put", size, n_clients, wall, lat, err, ops * n_clients))
                bar.update()
                rc = rd_client()
                for j, obj in enumerate(objs):
                    rc.set(b"bench/get/%d/%d" % (size, j), obj)
                rc.close()

                def rd_get(c, ci, i, size=size):
                    return c.get(b"bench/get/%d/%d" % (size, (ci + i) % n_objects))

                wall, lat, err = run_clients(n_clients, ops, rd_get, rd_client, check=same)
                rows.append(row("redis-py", "get", size, n_clients, wall, lat, err, ops * n_clients))
                bar.update()

            arrays = [np.frombuffer(o, dtype=np.uint8) for o in objs]

            def memcpy(c, ci, i, arrays=arrays):
                np.copyto(c, arrays[(ci + i) % n_objects])

            wall, lat, err = run_clients(n_clients, ops, memcpy, lambda size=size: np.empty(size, np.uint8))
            for op in ("put", "get"):
                rows.append(row("memcpy", op, size, n_clients, wall, lat, err, ops * n_clients))
            bar.update()
        bar.close()
    finally:
        kv_proc.terminate()
        nofsync_proc.terminate()
        behind_proc.terminate()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)

    add_ratios(rows)
    header = (f"{'system':<21} {'op':<4} {'object':>8} {'clients':>7} {'GB/s':>7} {'x redis':>7} {'p50 ms':>8} "
              f"{'p99 ms':>8} {'errors':>6}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = f"{r['x_redis']:>7.2f}" if r.get("x_redis") is not None else f"{'':>7}"
        print(f"{r['system']:<21} {r['op']:<4} {r['object_bytes'] // MiB:>5} MiB {r['clients']:>7} {r['GBps']:>7.3f} "
              f"{ratio} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>6}")
    verdicts = check_targets(rows)
    for line in verdicts:
        print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"chunk_bytes": chunk, "quick": args.quick, "cpu_count": os.cpu_count(),
                "load_average_1m_start_end": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
                "GBps": "1 client: object_bytes / median latency; N clients: bytes moved / wall time",
                "note": "loopback; server in a separate process; clients are threads of the bench process"}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "targets": verdicts}, indent=1) + "\n")
        plot(rows, args.json.with_suffix(".png"))
        print(f"wrote {args.json} and {args.json.with_suffix('.png')}")
    return 0


def _find(rows, system, op, size, clients):
    return next((r for r in rows if (r["system"], r["op"], r["object_bytes"], r["clients"]) ==
                 (system, op, size, clients)), None)


def add_ratios(rows: list[dict]) -> None:
    """``x_redis``: a kvstore row's GB/s over redis-py's for the same op, size and clients (same run)."""
    for r in rows:
        if r["system"].startswith("kvstore"):
            rd = _find(rows, "redis-py", r["op"], r["object_bytes"], r["clients"])
            r["x_redis"] = round(r["GBps"] / rd["GBps"], 3) if rd and rd["GBps"] > 0 else None


def check_targets(rows: list[dict]) -> list[str]:
    def find(system, op, size, clients):
        return _find(rows, system, op, size, clients)

    out = []
    for system in ("kvstore", "kvstore-nofsync", "kvstore-writebehind"):
        for size in sorted({r["object_bytes"] for r in rows}):
            for clients in sorted({r["clients"] for r in rows}):
                kv, rd = find(system, "put", size, clients), find("redis-py", "put", size, clients)
                if kv is not None and rd is not None:
                    out.append(f"target {system} put {size // MiB} MiB x{clients} >= redis-py SET: "
                               f"{kv['GBps']:.3f} vs {rd['GBps']:.3f} GB/s (x{kv['x_redis']:.2f}) -> "
                               f"{'met' if kv['GBps'] >= rd['GBps'] else 'MISSED'}")
    counts = sorted({r["clients"] for r in rows})
    for size in sorted({r["object_bytes"] for r in rows}):
        one, many = find("kvstore", "get", size, counts[0]), find("kvstore", "get", size, counts[-1])
        if one is not None and many is not None and counts[-1] > counts[0]:
            out.append(f"target kvstore get {size // MiB} MiB x{counts[-1]} aggregate >= x{counts[0]}: "
                       f"{many['GBps']:.3f} vs {one['GBps']:.3f} GB/s -> "
                       f"{'met' if many['GBps'] >= one['GBps'] else 'MISSED'}")
    kv = find("kvstore", "get", 8 * MiB, 1)
    rd = find("redis-py", "get", 8 * MiB, 1)
    if kv is not None:
        out.append(f"target kvstore get 8 MiB x1 >= 1 GB/s: {kv['GBps']:.3f} GB/s -> "
                   f"{'met' if kv['GBps'] >= 1.0 else 'MISSED'}")
        if rd is not None:
            out.append(f"target kvstore get 8 MiB x1 >= redis-py GET: {kv['GBps']:.3f} vs {rd['GBps']:.3f} GB/s -> "
                       f"{'met' if kv['GBps'] >= rd['GBps'] else 'MISSED'}")
    errs = sum(r["errors"] for r in rows if r["system"].startswith("kvstore"))
    out.append(f"target zero kvstore errors: {errs} -> {'met' if errs == 0 else 'MISSED'}")
    return out


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    configs = sorted({(r["op"], r["object_bytes"], r["clients"]) for r in rows})
    systems = ["kvstore", "kvstore-nofsync", "kvstore-writebehind", "redis-py", "memcpy"]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.16
    for k, system in enumerate(systems):
        vals = [next((r["GBps"] for r in rows if r["system"] == system and
                      (r["op"], r["object_bytes"], r["clients"]) == c), 0.0) for c in configs]
        ax.bar(np.arange(len(configs)) + (k - 2) * width, vals, width, label=system)
    ax.set_xticks(np.arange(len(configs)))
    ax.set_xticklabels([f"{op} {size // MiB}MiB x{n}" for op, size, n in configs], rotation=30, ha="right")
    ax.set_ylabel("GB/s")
    ax.set_yscale("log")
    ax.set_title("kvstore (RAM + disk: fsync, no fsync, write-behind) vs redis-py (no persistence) vs memcpy, loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
