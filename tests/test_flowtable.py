"""Flow tables: bounded, every removal counted, idle expiry in last-seen order."""

from __future__ import annotations

import pytest

from dataplane.core.flowtable import FlowTable
from dataplane.core.servicemap import InstanceState


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


def test_replica_count_follows_every_removal():
    """`replicas` (read by the metrics instead of walking the table) stays
    equal to the entries flagged, through evictions, expiry, deletes and
    replacement, and through a node's promotions and takeovers."""
    import random

    from tests.test_replicator import Pair

    rng = random.Random(5)
    t = FlowTable(capacity=20)
    for step in range(2000):
        key = (1, rng.randrange(80), 6, b"a", 1, b"b", 2)
        op = rng.random()
        if op < 0.5:
            e = t.insert(key, step, None)
            if rng.random() < 0.5:
                e.replica = True
                t.replicas += 1
            e.timeout = rng.choice((30.0, 3000.0))
        elif op < 0.7:
            t.delete(key)
        else:
            t.expire(step, 3000.0)
        assert t.replicas == sum(e.replica for e in t)
    assert t.counters["evicted"] and t.counters["expired"] and t.counters["deleted"]

    pair = Pair()
    for port in range(40000, 40040):
        pair.packet(rng.choice(("ba", "bb", "bc")), port)
    pair.run(0.05)
    new = pair.map.copy()
    new.set_state("ba", InstanceState.DEAD)
    assert sum(pair.reps[n].node.flows.replicas for n in ("bb", "bc")) > 0
    for name in ("bb", "bc"):
        node = pair.reps[name].node
        assert node.flows.replicas == sum(e.replica for e in node.flows)
        pair.reps[name].update_map(new, pair.now)
        assert node.flows.replicas == sum(e.replica for e in node.flows)
    assert sum(pair.reps[n].node.counters["promoted"] for n in ("bb", "bc")) > 0
