"""Flow tables: bounded, every removal counted, idle expiry in last-seen order."""

from __future__ import annotations

import pytest

from dataplane.core.flowtable import FlowTable


def key(i: int):
    return (1, i, 6, b"\x0a\x00\x00\x01", 1000 + i, b"\x0a\x00\x00\x02", 80)


def test_lru_eviction_is_counted():
    t = FlowTable(capacity=3)
    for i in range(3):
        t.insert(key(i), now=i)
    t.lookup(key(0), now=10)          # 0 is now the most recent
    t.insert(key(3), now=11)
    assert key(1) not in t and key(0) in t and len(t) == 3
    assert t.counters["evicted"] == 1 and t.counters["inserted"] == 4


def test_collisions_do_not_merge_flows():
    a = (1, 42, 6, b"\x0a\x00\x00\x01", 1, b"\x0a\x00\x00\x02", 80)
    b = (1, 42, 6, b"\x0a\x00\x00\x01", 2, b"\x0a\x00\x00\x02", 80)
    t = FlowTable()
    t.insert(a, 0, "A")
    t.insert(b, 0, "B")
    assert t.get(a).state == "A" and t.get(b).state == "B"


def test_expiry_uses_each_entry_timeout():
    t = FlowTable()
    short = t.insert(key(1), now=0)
    short.timeout = 5
    long = t.insert(key(2), now=0)
    long.timeout = 100
    t.insert(key(3), now=50).timeout = 5
    gone = t.expire(now=20, max_timeout=100)
    assert [e.key for e in gone] == [key(1)]
    assert t.counters["expired"] == 1
    gone = t.expire(now=101, max_timeout=100)
    assert {e.key for e in gone} == {key(2), key(3)}


def test_touch_keeps_last_seen_order_and_delete_counts():
    t = FlowTable()
    t.insert(key(1), now=0).timeout = 10
    t.insert(key(2), now=1).timeout = 10
    t.touch(key(1), now=50)
    assert [e.key for e in t.expire(now=30, max_timeout=10)] == [key(2)]
    assert t.delete(key(1), "deleted_by_peer") is not None
    assert t.counters["deleted_by_peer"] == 1 and len(t) == 0


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        FlowTable(0)
