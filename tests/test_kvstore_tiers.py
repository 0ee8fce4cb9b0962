"""RAM and disk tiers on their own: LRU budgets, durability layout, corruption, restart, path safety."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrecall.kvstore.keys import key_digest
from kvrecall.kvstore.objects import StoredObject, crc32_of
from kvrecall.kvstore.tiers_disk import HEADER, DiskStoreError, DiskTier
from kvrecall.kvstore.tiers_ram import RAM_ENTRY_OVERHEAD, RamTier


def obj(data: bytes, ttl: float = 0.0) -> StoredObject:
    return StoredObject(data, crc32_of(data), time.time() + ttl if ttl else 0.0)


def object_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "objects").rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------------- RAM
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3000), st.booleans()), max_size=60))
def test_ram_tier_stays_under_budget_and_evicts_least_recently_used(ops):
    budget = 8000
    ram = RamTier(budget)
    model: dict[bytes, bytes] = {}
    order: list[bytes] = []  # least recently used first
    for k, size, read in ops:
        key = b"k%d" % k
        if read:
            got = ram.get(key)
            if key in model:
                assert got is not None and got.data == model[key]
                order.remove(key)
                order.append(key)
            else:
                assert got is None
            continue
        data = bytes([k]) * size
        cost = len(key) + size + RAM_ENTRY_OVERHEAD
        stored = ram.put(key, obj(data))
        if key in model:
            del model[key]
            order.remove(key)
        assert stored == (cost <= budget)
        if stored:
            model[key] = data
            order.append(key)
            used = sum(len(x) + len(model[x]) + RAM_ENTRY_OVERHEAD for x in order)
            while used > budget:  # the model evicts from the LRU end, as the tier must
                victim = order.pop(0)
                used -= len(victim) + len(model.pop(victim)) + RAM_ENTRY_OVERHEAD
        assert ram.used_bytes <= budget
        assert set(ram._items) == set(model)


def test_ram_tier_expires_objects():
    ram = RamTier(1 << 20)
    ram.put(b"a", StoredObject(b"x", crc32_of(b"x"), time.time() - 1))
    assert ram.get(b"a") is None and ram.size_of(b"a") is None and len(ram) == 0


# ------------------------------------------------------------------------------------------------------- disk
def test_disk_round_trip_and_restart_keeps_objects(tmp_path):
    disk = DiskTier(tmp_path, 1 << 30)
    disk.open()
    payloads = {b"k%d" % i: random.Random(i).randbytes(i * 1000) for i in range(5)}
    for key, data in payloads.items():
        assert disk.put(key, obj(data))
    disk.close()
    again = DiskTier(tmp_path, 1 << 30)
    assert again.open() == 5
    for key, data in payloads.items():
        got = again.get(key)
        assert got is not None and bytes(got.data) == data and got.tier == "disk"
        assert again.size_of(key) == len(data)
    again.close()


def test_disk_directory_is_locked_to_one_server(tmp_path):
    first = DiskTier(tmp_path, 1 << 20)
    first.open()
    with pytest.raises(DiskStoreError, match="in use"):
        DiskTier(tmp_path, 1 << 20).open()
    first.close()
    second = DiskTier(tmp_path, 1 << 20)
    second.open()
    second.close()


def test_disk_keys_never_name_paths(tmp_path):
    disk = DiskTier(tmp_path / "store", 1 << 20)
    disk.open()
    evil = [b"../../escape", b"/etc/passwd", b"a/b/../../../c", b"\x00\xff", b"..", b"objects/../LOCK"]
    for key in evil:
        assert disk.put(key, obj(key * 3))
    files = object_files(tmp_path / "store")
    assert len(files) == len(evil)
    for f in files:
        assert f.resolve().is_relative_to((tmp_path / "store" / "objects").resolve())
        assert f.name == key_digest(next(k for k in evil if key_digest(k) == f.name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    for key in evil:
        assert bytes(disk.get(key).data) == key * 3
    disk.close()


@pytest.mark.parametrize("where", ["payload", "header", "truncate", "key"])
def test_corrupted_disk_object_is_never_served(tmp_path, where):
    disk = DiskTier(tmp_path, 1 << 20)
    disk.open()
    data = random.Random(1).randbytes(10_000)
    disk.put(b"victim", obj(data))
    disk.put(b"other", obj(b"fine"))
    path = tmp_path / "objects" / key_digest(b"victim")[:2] / key_digest(b"victim")
    raw = bytearray(path.read_bytes())
    if where == "payload":
        raw[-5000] ^= 0x01
    elif where == "header":
        raw[10] ^= 0x40  # object size field
    elif where == "key":
        raw[HEADER.size] ^= 0x01
    else:
        raw = raw[:-1]
    path.write_bytes(bytes(raw))
    assert disk.get(b"victim") is None
    assert not path.exists() and disk.corrupt == 1
    assert disk.size_of(b"victim") is None
    assert bytes(disk.get(b"other").data) == b"fine"
    disk.close()


def test_corrupt_header_is_dropped_when_the_index_is_rebuilt(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    disk.open()
    disk.put(b"a", obj(b"aaaa"))
    disk.close()
    path = tmp_path / "objects" / key_digest(b"a")[:2] / key_digest(b"a")
    raw = bytearray(path.read_bytes())
    raw[0:4] = b"XXXX"
    path.write_bytes(bytes(raw))
    again = DiskTier(tmp_path, 1 << 20)
    assert again.open() == 0 and again.corrupt == 1 and not path.exists()
    again.close()


def test_unfinished_writes_are_cleared_on_open(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    disk.open()
    disk.close()
    partial = tmp_path / "tmp" / f"{key_digest(b'x')}.123.456.part"
    partial.write_bytes(b"KVRC" + b"\x00" * 10)  # what kill -9 mid-write leaves behind
    again = DiskTier(tmp_path, 1 << 20)
    assert again.open() == 0
    assert list((tmp_path / "tmp").iterdir()) == [] and again.get(b"x") is None
    again.close()


def test_disk_budget_evicts_least_recently_used_and_survives_restart(tmp_path):
    budget = 50_000
    disk = DiskTier(tmp_path, budget, fsync=False)
    disk.open()
    for i in range(4):
        disk.put(b"k%d" % i, obj(bytes(10_000)))
        time.sleep(0.01)  # distinct mtimes: the LRU order must survive restart
    for i in range(4, 8):
        assert disk.get(b"k0") is not None  # k0 stays the most recently used
        time.sleep(0.01)
        disk.put(b"k%d" % i, obj(bytes(10_000)))
        assert sum(f.stat().st_size for f in object_files(tmp_path)) <= budget
        assert disk.used_bytes <= budget
        time.sleep(0.01)
    assert disk.evictions == 4
    present = {i for i in range(8) if disk.size_of(b"k%d" % i) is not None}
    assert present == {0, 5, 6, 7}
    assert not disk.put(b"huge", obj(bytes(budget)))  # bigger than the whole budget: refused, nothing evicted
    disk.close()
    smaller = DiskTier(tmp_path, 25_000)
    smaller.open()  # a smaller budget at restart evicts by last use (reads bump mtime), oldest first
    assert {i for i in range(8) if smaller.size_of(b"k%d" % i) is not None} == {0, 7}
    smaller.close()


def test_disk_objects_expire(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20, fsync=False)
    disk.open()
    disk.put(b"short", obj(b"x", ttl=0.6))
    disk.put(b"long", obj(b"y", ttl=60))
    assert disk.get(b"short") is not None
    time.sleep(0.7)
    assert disk.get(b"short") is None and disk.size_of(b"short") is None
    assert disk.get(b"long") is not None
    disk.close()


def test_disk_rewrite_replaces_atomically(tmp_path):
    disk = DiskTier(tmp_path, 1 << 20)
    disk.open()
    disk.put(b"k", obj(b"one" * 100))
    disk.put(b"k", obj(b"two" * 50))
    assert bytes(disk.get(b"k").data) == b"two" * 50
    assert len(object_files(tmp_path)) == 1 and disk.used_bytes == os.path.getsize(object_files(tmp_path)[0])
    assert disk.delete(b"k") and not object_files(tmp_path) and disk.used_bytes == 0
    disk.close()
