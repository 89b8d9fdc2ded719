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
    assert t.counters["evicted_embryonic"] == 1 and t.counters["inserted"] == 4


def test_embryonic_entries_are_evicted_before_established_ones():
    t = FlowTable(capacity=3)
    old = t.insert(key(0), now=0, established=True)
    t.insert(key(1), now=1, tenant=5)
    t.insert(key(2), now=2, tenant=5)
    t.insert(key(3), now=3, tenant=6)           # evicts 1, the oldest embryonic, not 0
    assert key(0) in t and key(1) not in t
    assert t.embryonic_of(5) == 1 and t.embryonic_of(6) == 1
    t.establish(t.get(key(2)))                  # 2 answered: no longer counts for tenant 5
    assert t.embryonic_of(5) == 0 and t.embryonic == 1
    t.insert(key(4), now=4, established=True)   # evicts 3, the last embryonic
    t.insert(key(5), now=5, established=True)   # none left: the LRU established one, 0
    assert old.key not in t and [e.key for e in t] == [key(2), key(4), key(5)]
    assert t.counters["evicted_embryonic"] == 2 and t.counters["evicted_established"] == 1
    assert t.embryonic_of(6) == 0


def test_eviction_is_first_in_first_out_without_scanning():
    """Eviction pops the front of an OrderedDict: O(1) however many entries
    were deleted before it (a plain dict's `d.pop(next(iter(d)))` walks over
    every deleted slot at its front). Checked by structure, not by time:
    the classes are OrderedDicts evicted with popitem, and after a churn of
    inserts the table holds exactly the newest `capacity` keys."""
    from collections import OrderedDict

    t = FlowTable(capacity=100)
    assert type(t._embryonic) is OrderedDict and type(t._established) is OrderedDict
    for i in range(10_000):
        t.insert(key(i), now=i)
    assert [e.key for e in t] == [key(i) for i in range(9900, 10_000)]
    assert t.counters["evicted_embryonic"] == 9900


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
            e = t.insert(key, step, None, tenant=rng.choice((None, 1, 2)),
                         established=rng.random() < 0.3)
            if rng.random() < 0.5:
                e.replica = True
                t.replicas += 1
            e.timeout = rng.choice((30.0, 3000.0))
        elif op < 0.6:
            e = t.get(key)
            if e is not None:
                t.establish(e)
        elif op < 0.75:
            t.delete(key)
        else:
            t.expire(step, 3000.0)
        assert t.replicas == sum(e.replica for e in t)
        assert t.embryonic == sum(not e.established for e in t) and len(t) <= 20
        for tenant in (1, 2):
            assert t.embryonic_of(tenant) == sum(not e.established and e.tenant == tenant for e in t)
    assert t.counters["evicted_embryonic"] and t.counters["evicted_established"]
    assert t.counters["expired"] and t.counters["deleted"]

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


def test_every_delete_of_a_cause_is_counted():
    t = FlowTable()
    for i in range(3):
        t.insert(key(i), now=0)
    t.delete(key(0))
    t.delete(key(1))
    t.delete(key(2), "deleted_by_peer")
    assert t.delete(key(2)) is None                 # already gone: nothing counted
    assert t.counters["deleted"] == 2 and t.counters["deleted_by_peer"] == 1


def test_repr_names_code_version_packets_hops_and_role():
    t = FlowTable()
    e = t.insert((1, 0xABC, 6, b"a", 1, b"b", 2), now=0)
    e.version, e.packets, e.fwd_hop, e.prev_hop, e.replica = 3, 7, "bb", "aa", True
    assert repr(e) == "FlowEntry(code=0x00000abc v3 pkts=7 fwd=bb prev=aa replica=True)"


def test_expiry_budget_is_shared_by_both_classes():
    """One call looks at `budget` entries at most, embryonic first, and the
    established class gets what the embryonic scan left."""
    def table(embryonic: int, established: int) -> FlowTable:
        t = FlowTable()
        for i in range(embryonic + established):
            t.insert(key(i), now=0, established=i >= embryonic).timeout = 1
        return t

    for emb, est, budget, gone in [(2, 2, 3, 3), (1, 3, 10, 4), (1, 2, 3, 3), (5, 0, 2, 2), (0, 5, 2, 2)]:
        t = table(emb, est)
        out = t.expire(now=5, max_timeout=1, budget=budget)
        assert len(out) == gone and len(t) == emb + est - gone, (emb, est, budget)
    t = table(10_001, 0)
    assert len(t.expire(now=5, max_timeout=1)) == 10_000          # the default budget


def test_an_entry_expires_at_its_last_seen_plus_timeout_exactly():
    t = FlowTable()
    t.insert(key(1), now=0).timeout = 10
    assert t.expire(now=9.5, max_timeout=10) == [] and len(t.expire(now=10, max_timeout=10)) == 1


def test_expiries_add_up_and_every_removal_moves_the_generation_forward():
    t = FlowTable()
    seen = [t.generation]
    for i in range(6):
        t.insert(key(i), now=i).timeout = 1
    for now in (2.5, 4.5, 9):
        assert t.expire(now=now, max_timeout=1)
        seen.append(t.generation)
        t.insert(key(0), now=now)                   # a new entry removes nothing
        t.insert(key(0), now=now)                   # a replacement does
        seen.append(t.generation)
        t.delete(key(0))
        seen.append(t.generation)
    assert t.counters["expired"] == 6
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_establishing_an_entry_no_longer_in_the_table_changes_nothing():
    t = FlowTable()
    e = t.insert(key(1), now=0, tenant=3)
    t.delete(key(1))
    t.establish(e)                                  # removed meanwhile: a no-op, not an error
    assert not e.established and len(t) == 0 and t.embryonic_of(3) == 0


def test_hits_and_misses_are_counted_and_a_hit_refreshes_last_seen():
    t = FlowTable(capacity=1)                       # one entry is a table
    assert t.lookup(key(1), now=0) is None and t.lookup(key(2), now=0) is None
    e = t.insert(key(1), now=0)
    assert t.lookup(key(1), now=5) is e and t.lookup(key(1), now=7) is e and e.last_seen == 7
    assert t.counters["misses"] == 2 and t.counters["hits"] == 2
    with pytest.raises(ValueError) as err:
        FlowTable(0)
    assert str(err.value) == "flow table capacity must be at least 1"


def test_a_new_entry_is_embryonic_and_unpinned_and_evictions_are_reported():
    from dataplane.core.flowtable import FlowEntry

    e = FlowEntry(key(1), 0.0)
    assert (e.established, e.fwd_hop, e.prev_hop, e.replica, e.version) == (False, None, None, False, 0)
    evicted = []
    t = FlowTable(capacity=1, on_evict=lambda entry, now: evicted.append((entry.key, now)))
    t.insert(key(1), now=0)
    t.insert(key(2), now=3)
    assert evicted == [(key(1), 3)]


def test_a_new_entry_has_counted_nothing_and_is_dated_from_its_insert():
    """A flow's counters start at zero and its age (`created`, shown by the
    forwarder's flow listing) is that of its insert, not of its last packet."""
    t = FlowTable()
    e = t.insert(key(1), now=3.0)
    assert (e.packets, e.rev_packets, e.bytes) == (0, 0, 0)
    assert e.created == e.last_seen == 3.0
    t.lookup(key(1), now=8.0)
    assert e.created == 3.0 and e.last_seen == 8.0


def test_an_idle_entry_expires_after_the_default_timeout_unless_given_another():
    from dataplane.core.flowtable import DEFAULT_TIMEOUT

    t = FlowTable()
    e = t.insert(key(1), now=0)
    assert e.timeout == DEFAULT_TIMEOUT == 60.0
    assert t.expire(now=59.0, max_timeout=DEFAULT_TIMEOUT) == []
    assert t.expire(now=60.0, max_timeout=DEFAULT_TIMEOUT) == [e]


# -- floods (issue #14, finding 4) ------------------------------------------------------

import struct

from dataplane.core import header as wire
from dataplane.core.events import Drop, Send
from dataplane.core.node import ServiceNode
from dataplane.core.services import create
from tests.conftest import pair_map

_IP = struct.Struct("!BBHHHBBH4s4s")
_TCPH = struct.Struct("!HHIIBBHHH")
CLIENT, SERVER = bytes([10, 1, 0, 10]), bytes([10, 2, 0, 10])
FLAGS = {"S": 0x02, "SA": 0x12, "A": 0x10, "R": 0x04}


def raw_tcp(sport: int, flags: str, seq: int, ack: int = 0, reply: bool = False,
            client: bytes = CLIENT) -> bytes:
    """An IPv4/TCP packet by struct (10,000 of them through Scapy would be slow)."""
    src, dst, sp, dp = (SERVER, client, 80, sport) if reply else (client, SERVER, sport, 80)
    tcph = _TCPH.pack(sp, dp, seq, ack, 5 << 4, FLAGS[flags], 65535, 0, 0)
    return _IP.pack(0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst) + tcph


def fabric(inner: bytes, reply: bool = False, tenant: int = 1, code: int = 7) -> bytes:
    return wire.pack(1, 1, code, tenant, 1, wire.Flags.REVERSE if reply else 0) + inner


def firewall_node(capacity: int, **kw) -> ServiceNode:
    return ServiceNode("ba", pair_map(), create("firewall"), capacity=capacity, **kw)


def open_connection(node: ServiceNode, sport: int, now: float = 0.0) -> None:
    for data, reply in ((raw_tcp(sport, "S", 100), False), (raw_tcp(sport, "SA", 900, 101, True), True),
                        (raw_tcp(sport, "A", 101, 901), False)):
        events = node.from_fabric(fabric(data, reply), "ingress" if not reply else "egress", now)
        assert any(isinstance(e, Send) for e in events), events


def test_a_syn_flood_does_not_evict_established_connections():
    """10,000 SYNs into a full 10,000-entry table holding 100 established
    connections evict none of them (pure LRU evicted all 100)."""
    node = firewall_node(10_000)
    live = range(20000, 20100)
    for port in live:
        open_connection(node, port)
    for i in range(10_000):
        node.from_fabric(fabric(raw_tcp(30000 + i % 30000, "S", i), code=8 + i // 30000), "ingress", 1.0)
    assert len(node.flows) == 10_000
    from dataplane.core.node import flow_key
    from dataplane.core.packet import parse
    kept = [p for p in live if flow_key(1, 7, parse(raw_tcp(p, "A", 101, 901)))[0] in node.flows]
    assert len(kept) == 100
    assert node.flows.counters["evicted_embryonic"] == 100   # 9,900 SYNs filled it, 100 pushed out
    assert node.flows.counters["evicted_established"] == 0


def test_embryonic_flows_are_capped_per_tenant_and_counted():
    """Tenant 1 floods: past its cap its new flows are refused
    (`embryonic_limit`); tenant 2 still opens flows; once one of tenant 1's
    flows is answered, tenant 1 may open one more."""
    node = firewall_node(1000, embryonic_per_tenant=50)
    for i in range(80):
        node.from_fabric(fabric(raw_tcp(30000 + i, "S", i), tenant=1), "ingress", 0.0)
    assert node.flows.embryonic_of(1) == 50 and node.drops["embryonic_limit"] == 30
    other = bytes([10, 1, 0, 11])
    for i in range(10):
        events = node.from_fabric(fabric(raw_tcp(30000 + i, "S", i, client=other), tenant=2), "ingress", 0.0)
        assert any(isinstance(e, Send) for e in events)
    assert node.flows.embryonic_of(2) == 10 and node.drops["embryonic_limit"] == 30
    refused = node.from_fabric(fabric(raw_tcp(31000, "S", 1), tenant=1), "ingress", 0.0)
    assert isinstance(refused[-1], Drop) and refused[-1].reason == "embryonic_limit"
    node.from_fabric(fabric(raw_tcp(30000, "SA", 900, 1, True), True), "egress", 0.0)
    node.from_fabric(fabric(raw_tcp(30000, "A", 1, 901)), "ingress", 0.0)
    assert node.flows.embryonic_of(1) == 49
    assert any(isinstance(e, Send) for e in node.from_fabric(fabric(raw_tcp(31000, "S", 1), tenant=1),
                                                             "ingress", 0.0))


def test_embryonic_cap_must_be_positive():
    with pytest.raises(ValueError):
        firewall_node(10, embryonic_per_tenant=0)


def test_the_egress_keeps_answered_flows_through_a_flood():
    """The egress' entry of a flow the server answered is established: a
    flood of new flows through a full egress table does not push it out
    (else the server's next packets are dropped as no_flow_return)."""
    from dataplane.core.node import EgressNode

    egress = EgressNode("egress", pair_map(), capacity=100)
    down = wire.pack(1, 0, 7, 1, 1) + raw_tcp(20000, "S", 100)
    egress.from_fabric(down, "ba", 0.0)
    assert any(isinstance(e, Send) for e in egress.from_server(raw_tcp(20000, "SA", 900, 101, True), 0.0))
    for i in range(1000):
        egress.from_fabric(wire.pack(1, 0, 7, 1, 1) + raw_tcp(30000 + i, "S", i), "ba", 1.0)
    assert any(isinstance(e, Send) for e in egress.from_server(raw_tcp(20000, "A", 901, 101, True), 2.0))
    assert egress.drops["no_flow_return"] == 0
