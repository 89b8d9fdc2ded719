"""The sans-I/O nodes: encapsulation, validation, pinning, mirroring, return path."""

from __future__ import annotations

from collections import Counter

import pytest

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.core.events import Deliver, Drop, Mirror, Send, TookOver
from dataplane.core.node import EGRESS, INGRESS, EgressNode, IngressNode, ServiceNode
from dataplane.core.servicemap import Chain, InstanceState, ServiceMap, Tenant
from dataplane.core.services import create
from dataplane.core.services.firewall import TcpState
from tests.conftest import codes_led_by, pair_map, tcp, udp

HASHER = AffinityHasher(b"node-tests")


def lab_map() -> ServiceMap:
    m = ServiceMap(buckets=1024)
    m.add_service(INGRESS, [INGRESS])
    m.add_service("A", ["aa", "ab"])
    m.add_service("B", ["ba", "bb", "bc"])
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "t1", ["10.1.0.0/16"]))
    m.add_chain(Chain(1, 1, ["A", "B"]))
    return m


class Mesh:
    """All nodes of `lab_map`, wired in memory; records every hop."""

    def __init__(self, sync: bool = True) -> None:
        self.map = lab_map()
        self.nodes = {INGRESS: IngressNode(INGRESS, self.map, HASHER), EGRESS: EgressNode(EGRESS, self.map)}
        for n in ("aa", "ab"):
            self.nodes[n] = ServiceNode(n, self.map, create("inspection"))
        for n in ("ba", "bb", "bc"):
            self.nodes[n] = ServiceNode(n, self.map, create("firewall"))
        self.sync = sync
        self.hops: list[tuple[str, str, wire.Header]] = []
        self.delivered: dict[str, list[bytes]] = {INGRESS: [], EGRESS: []}
        self.options: list[bytes] = []
        self.dead: set[str] = set()

    def run(self, src, events, now=0.0):
        for ev in events:
            if isinstance(ev, Send):
                assert ev.to not in self.dead, f"packet sent to dead {ev.to}"
                self.hops.append((src, ev.to, wire.decode(ev.data)))
                self.run(ev.to, self.nodes[ev.to].from_fabric(ev.data, src, now), now)
            elif isinstance(ev, Deliver):
                self.delivered[src].append(ev.data)
                self.options.append(ev.options)
            elif isinstance(ev, Mirror) and self.sync:
                self.nodes[ev.to].apply_update(ev.update, now)

    def client(self, data, now=0.0, options=b""):
        self.run(INGRESS, self.nodes[INGRESS].from_client(data, now, options), now)

    def server(self, data, now=0.0, options=b""):
        self.run(EGRESS, self.nodes[EGRESS].from_server(data, now, options), now)

    def kill(self, name, now=0.0):
        self.dead.add(name)
        new = self.map.copy()
        new.set_state(name, InstanceState.DEAD)
        for n, node in self.nodes.items():
            if n not in self.dead:
                node.update_map(new, now)
        self.map = new


def path(mesh, start=0):
    return [(a, b) for a, b, _ in mesh.hops[start:]]


def test_forward_and_return_cross_the_same_instances():
    mesh = Mesh()
    mesh.client(tcp(flags="S", seq=1))
    fwd = path(mesh)
    assert fwd[0][0] == INGRESS and fwd[-1][1] == EGRESS and len(fwd) == 3
    a, b = fwd[0][1], fwd[1][1]
    code = HASHER.code_of(1, "10.1.0.10", 40000, "10.2.0.10", 80, 6)
    assert a == mesh.map.primary("A", code) and b == mesh.map.primary("B", code)
    assert [h.index for _, _, h in mesh.hops] == [2, 1, 0]
    assert all(h.code == code and h.client == 1 and h.chain == 1 for _, _, h in mesh.hops)
    mesh.server(tcp("10.2.0.10", "10.1.0.10", 80, 40000, "SA", seq=9, ack=2))
    back = path(mesh, 3)
    assert back == [(EGRESS, b), (b, a), (a, INGRESS)]
    assert all(h.flags & wire.Flags.REVERSE for _, _, h in mesh.hops[3:])
    assert len(mesh.delivered[EGRESS]) == 1 and len(mesh.delivered[INGRESS]) == 1
    assert mesh.delivered[EGRESS][0] == tcp(flags="S", seq=1)


def test_header_options_cross_the_chain_both_ways():
    """A GSO option put in by one edge comes out at the other, through every
    instance; packets without options stay at 20 bytes of header."""
    mesh = Mesh()
    gso = wire.pack_gso(1, 1, 54, 1448, 34, 16)
    mesh.client(tcp(flags="S", seq=1), options=gso)
    assert [h.length for _, _, h in mesh.hops] == [32, 32, 32]
    mesh.server(tcp("10.2.0.10", "10.1.0.10", 80, 40000, "SA", seq=9, ack=2))
    assert [h.length for _, _, h in mesh.hops[3:]] == [20, 20, 20]
    mesh.client(tcp(flags="PA", seq=2, ack=10, payload=b"x" * 3000), options=gso)
    assert mesh.options == [gso, b"", gso]
    assert mesh.delivered[EGRESS][-1] == tcp(flags="PA", seq=2, ack=10, payload=b"x" * 3000)


def test_secondary_holds_a_replica_and_takes_over_with_rerouted_flag():
    mesh = Mesh()
    mesh.client(tcp(flags="S", seq=1))
    b = mesh.hops[1][1]
    code = mesh.hops[0][2].code
    sec = mesh.map.secondary("B", code)
    replica = next(iter(mesh.nodes[sec].flows))
    assert replica.replica and replica.version == 1
    mesh.kill(b)
    n = len(mesh.hops)
    mesh.server(tcp("10.2.0.10", "10.1.0.10", 80, 40000, "SA", seq=9, ack=2))
    first = mesh.hops[n]
    assert first[1] == sec and first[2].flags & wire.Flags.REROUTED
    assert mesh.nodes[sec].counters["took_over"] == 1
    mesh.client(tcp(flags="A", seq=2, ack=10))     # A's pin was dead too: rerouted once
    assert mesh.hops[-2][1] == sec and mesh.hops[-2][2].flags & wire.Flags.REROUTED
    mesh.client(tcp(flags="PA", seq=2, ack=10, payload=b"data"))
    assert mesh.hops[-2][1] == sec and not mesh.hops[-2][2].flags & wire.Flags.REROUTED
    assert len(mesh.delivered[EGRESS]) == 3


def test_without_sync_the_secondary_drops_as_misdelivery():
    mesh = Mesh(sync=False)
    mesh.client(tcp(flags="S", seq=1))
    b = mesh.hops[1][1]
    mesh.kill(b)
    mesh.client(tcp(flags="A", seq=2, ack=10))
    sec = mesh.map.primary("B", mesh.hops[0][2].code)
    assert mesh.nodes[sec].drops["misdelivery"] == 1


def test_updates_only_move_forward():
    mesh = Mesh()
    mesh.client(tcp(flags="S", seq=1))
    code = mesh.hops[0][2].code
    prim = mesh.nodes[mesh.map.primary("B", code)]
    sec = mesh.nodes[mesh.map.secondary("B", code)]
    entry = next(iter(prim.flows))
    old = prim.update_of(entry)
    mesh.client(tcp(flags="A", seq=2, ack=10))  # no SYN/ACK seen: no transition, nothing mirrored
    mesh.server(tcp("10.2.0.10", "10.1.0.10", 80, 40000, "SA", seq=9, ack=2))
    assert entry.version == 2
    assert not sec.apply_update(old, 1.0)
    assert sec.counters["stale_updates"] == 1
    assert next(iter(sec.flows)).version == 2


def test_expiry_mirrors_deletes():
    mesh = Mesh()
    mesh.client(tcp(flags="S", seq=1))
    code = mesh.hops[0][2].code
    prim = mesh.nodes[mesh.map.primary("B", code)]
    events = prim.expire(now=10_000.0)
    assert len(events) == 1 and isinstance(events[0], Mirror) and events[0].update.deleted
    mesh.run(prim.name, events)
    sec = mesh.nodes[mesh.map.secondary("B", code)]
    assert len(sec.flows) == 0 and sec.flows.counters["deleted_by_peer"] == 1


def fabric_packet(**overrides) -> bytes:
    fields = dict(chain=1, index=1, code=5, client=1, epoch=1)
    fields.update(overrides)
    return wire.pack(**fields) + tcp(flags="S")


@pytest.mark.parametrize("data,reason", [
    (b"\x10\x3f", "truncated"),
    (bytes([0x20]) + fabric_packet()[1:], "bad_version"),
    (fabric_packet()[:2] + bytes([200]) + fabric_packet()[3:], "bad_length"),
    (fabric_packet(ttl=0), "ttl_expired"),
    (fabric_packet(chain=99), "unknown_chain"),
    (fabric_packet(index=0), "bad_index"),
    (fabric_packet(index=3), "bad_index"),
    (fabric_packet(index=2), "wrong_service"),
    (wire.pack(1, 1, 5, 1, 1) + b"\x45\x00", "inner_truncated"),
])
def test_malformed_fabric_packets_are_dropped_and_counted(data, reason):
    node = Mesh().nodes["ba"]
    events = node.from_fabric(data, "aa", 0.0)
    assert len(events) == 1 and isinstance(events[0], Drop)
    assert node.drops[reason] == 1


def test_a_packet_that_would_leave_with_ttl_0_is_dropped_and_counted():
    """TTL 1 in means TTL 0 out: dropped before it changes any state (issue
    #14, finding 9: such a packet, kept for resending, broke the reroute)."""
    node = Mesh().nodes["ba"]
    sent = [e for e in node.from_fabric(fabric_packet(ttl=2), "aa", 0.0) if isinstance(e, Send)]
    assert wire.decode(sent[0].data).ttl == 1
    for data in (fabric_packet(ttl=1, code=6), fabric_packet(ttl=1)):   # a new flow; a known one
        assert [type(e) for e in node.from_fabric(data, "aa", 0.0)] == [Drop]
    assert node.drops["ttl_expired"] == 2 and len(node.flows) == 1


def test_ingress_refusals():
    mesh = Mesh()
    ing = mesh.nodes[INGRESS]
    assert isinstance(ing.from_client(tcp(src="192.0.2.1"), 0)[0], Drop)
    assert ing.drops["unknown_tenant"] == 1
    ing.from_client(udp(dport=wire.UDP_PORT, payload=wire.pack(1, 1, 5, 1, 1)), 0)
    assert ing.drops["steering_attempt"] == 1
    mesh.nodes[EGRESS].from_server(tcp("10.2.0.10", "10.1.0.10", 80, 1, "SA"), 0)
    assert mesh.nodes[EGRESS].drops["no_flow_return"] == 1


def test_older_epoch_is_served_and_counted():
    mesh = Mesh()
    mesh.client(tcp(flags="S", seq=1))
    a_hop = mesh.hops[0]
    b = mesh.hops[1][1]
    newer = mesh.map.copy()
    newer.add_tenant(Tenant(2, "t2", ["10.3.0.0/16"]))
    mesh.nodes[a_hop[1]].update_map(newer, 0.0)
    node = mesh.nodes[b]
    data = wire.pack(1, 1, a_hop[2].code, 1, 1) + tcp(flags="A", seq=2, ack=0)
    node.update_map(newer, 0.0)
    events = node.from_fabric(data, a_hop[1], 0.0)
    assert any(isinstance(e, Send) for e in events) and node.counters["older_epoch"] == 1
    assert not node.update_map(mesh.map, 0.0) and node.counters["stale_map"] == 1


def test_took_over_event_once():
    mesh = Mesh()
    mesh.client(tcp(flags="S", seq=1))
    code = mesh.hops[0][2].code
    b = mesh.map.primary("B", code)
    sec = mesh.map.secondary("B", code)
    mesh.kill(b)
    node = mesh.nodes[sec]
    a = mesh.hops[0][1]
    data = wire.pack(1, 1, code, 1, mesh.map.epoch) + tcp(flags="S", seq=1)
    assert any(isinstance(e, TookOver) for e in node.from_fabric(data, a, 0.0))
    assert not any(isinstance(e, TookOver) for e in node.from_fabric(data, a, 0.0))


def test_rejected_connection_gets_a_reset_back_to_the_client():
    mesh = Mesh()
    for n in ("ba", "bb", "bc"):
        mesh.nodes[n].service = create("firewall", reject_ports=[8080])
    mesh.client(tcp(dport=8080, flags="S", seq=77))
    assert mesh.delivered[EGRESS] == []
    assert len(mesh.delivered[INGRESS]) == 1
    from scapy.layers.inet import IP, TCP
    rst = IP(mesh.delivered[INGRESS][0])
    assert rst[TCP].flags == "RA" and rst[TCP].ack == 78 and rst[TCP].dport == 40000
    assert rst.src == "10.2.0.10" and rst.dst == "10.1.0.10"


def test_a_promoted_secondary_refuses_a_blind_rst_and_takes_the_exact_one():
    """Issue #14, finding 5, across a failover: the window is in the
    mirrored state, so the promoted secondary drops a blind in-window RST
    (`rst_challenge`) and one far outside (`rst_out_of_window`), and the
    connection carries on; a RST at the server's next expected byte closes it."""
    mesh = Mesh()
    server = ("10.2.0.10", "10.1.0.10", 80, 40000)
    mesh.client(tcp(flags="S", seq=100))
    mesh.server(tcp(*server, "SA", seq=900, ack=101))
    mesh.client(tcp(flags="A", seq=101, ack=901))
    mesh.client(tcp(flags="PA", seq=101, ack=901, payload=b"x" * 500))
    mesh.server(tcp(*server, "A", seq=901, ack=601))
    code = mesh.hops[0][2].code
    primary, sec = mesh.map.primary("B", code), mesh.map.secondary("B", code)
    mesh.kill(primary)
    node = mesh.nodes[sec]
    mesh.client(tcp(flags="PA", seq=601, ack=901, payload=b"y" * 100))    # the stream goes on
    mesh.server(tcp(*server, "A", seq=901, ack=701))
    delivered = len(mesh.delivered[EGRESS])
    mesh.client(tcp(flags="R", seq=701 + 3000))                          # blind, in window
    mesh.client(tcp(flags="R", seq=(701 + (1 << 31)) % (1 << 32)))      # blind, far out
    assert node.drops["rst_challenge"] == 1 and node.drops["rst_out_of_window"] == 1
    entry = next(e for e in node.flows if e.key[2] == 6)
    assert entry.state.state == TcpState.ESTABLISHED
    mesh.client(tcp(flags="PA", seq=701, ack=901, payload=b"z" * 10))     # still carried
    assert len(mesh.delivered[EGRESS]) == delivered + 1
    mesh.client(tcp(flags="R", seq=711))                                  # exact
    assert entry.state.state == TcpState.CLOSED
    assert mesh.delivered[EGRESS][-1] == tcp(flags="R", seq=711)


def _udp_flow(capacity: int = 1 << 20, sport: int = 5000):
    """A primary `ba` and its secondary `bb` of `pair_map`, and the Mirror
    that opened a UDP flow on `ba` (version 1)."""
    m = pair_map()
    prim = ServiceNode("ba", m, create("firewall"), capacity=capacity)
    sec = ServiceNode("bb", m, create("firewall"), capacity=capacity)
    code = codes_led_by(m, "ba")[0]
    out = prim.from_fabric(wire.pack(1, 1, code, 1, m.epoch) + udp(sport=sport), INGRESS, 0.0)
    mirror = next(e for e in out if isinstance(e, Mirror))
    return prim, sec, mirror.update, wire.pack(1, 1, code, 1, m.epoch) + udp(sport=sport)


def test_a_deleted_flow_does_not_come_back():
    """Upsert v1, delete v2, upsert v1 again (a bulk snapshot trailing the
    expiry): the replica keeps the flow deleted, and counts the stale upsert."""
    prim, sec, upsert, _ = _udp_flow()
    assert upsert.version == 1 and sec.apply_update(upsert, 0.0)
    [delete] = prim.expire(1000.0)
    assert delete.update.deleted and delete.update.version == 2
    assert sec.apply_update(delete.update, 1000.0)
    assert not sec.apply_update(upsert, 1000.5)
    assert upsert.key not in sec.flows and sec.counters["stale_updates"] == 1
    # the delete may also overtake the upsert: the late upsert stays out
    _, other, up, _ = _udp_flow()
    assert other.apply_update(delete.update, 0.0) and not other.apply_update(up, 0.1)
    assert len(other.flows) == 0


def test_a_new_flow_under_a_deleted_key_is_mirrored():
    """The primary remembers the delete too: a new flow with the same key
    starts its versions after it, so the replica takes it."""
    prim, sec, upsert, packet = _udp_flow()
    sec.apply_update(upsert, 0.0)
    [delete] = prim.expire(1000.0)
    sec.apply_update(delete.update, 1000.0)
    again = [e for e in prim.from_fabric(packet, INGRESS, 1001.0) if isinstance(e, Mirror)]
    assert again[0].update.version == 3
    assert sec.apply_update(again[0].update, 1001.0) and upsert.key in sec.flows


def test_a_flow_evicted_on_its_primary_comes_back_past_its_replica():
    """A full table evicts a flow this primary leads; when the flow comes
    back, the new entry's versions start past the evicted one's, so the
    replica (which still holds the old, higher version) takes its updates
    instead of keeping a stale state as `stale_updates`."""
    prim, sec, upsert, packet = _udp_flow(capacity=2)
    sec.apply_update(upsert, 0.0)
    code = codes_led_by(prim.map, "ba")[0]
    for sport in (5998, 5999):
        prim.from_fabric(wire.pack(1, 1, code, 1, prim.map.epoch) + udp(sport=sport), INGRESS, 0.1)
    assert upsert.key not in prim.flows                                    # evicted
    again = [e for e in prim.from_fabric(packet, INGRESS, 0.2) if isinstance(e, Mirror)]
    assert again[0].update.version > upsert.version
    assert sec.apply_update(again[0].update, 0.2) and sec.counters["stale_updates"] == 0


def test_tombstones_are_bounded():
    """A tombstone lasts the service's longest timeout, and there are never
    more than the flow table's capacity (the oldest go first, counted)."""
    prim, sec, upsert, _ = _udp_flow()
    [delete] = prim.expire(1000.0)
    sec.apply_update(delete.update, 1000.0)
    late = 1000.0 + sec.service.max_timeout
    assert not sec.apply_update(upsert, late - 1)
    sec.expire(late)
    assert sec.apply_update(upsert, late)  # forgotten: an update that old is no longer in flight
    flows = [_udp_flow(capacity=2, sport=5000 + i) for i in range(3)]
    _, sec, _, _ = flows[0]
    for prim, _, up, _ in flows:
        [delete] = prim.expire(1000.0)
        sec.apply_update(delete.update, 1000.0)
    assert sec.counters["tombstones_dropped"] == 1
    assert sec.apply_update(flows[0][2], 1000.0)  # the oldest tombstone went
    assert not sec.apply_update(flows[2][2], 1000.0)



KINDS = ["firewall", "inspection", "nat", "passthrough"]
PORTS = range(40000, 40060)


def _group(kind: str, members: tuple[str, ...] = ("s1", "s2", "s3")
           ) -> tuple[ServiceMap, dict[str, ServiceNode | IngressNode | EgressNode]]:
    """ingress -> S (`members`, all of `kind`) -> egress."""
    m = ServiceMap(buckets=1024)
    m.add_service(INGRESS, [INGRESS])
    m.add_service("S", list(members))
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "t1", ["10.1.0.0/16"]))
    m.add_chain(Chain(1, 1, ["S"]))
    options = {"pool": ["198.51.100.7"], "ports": [20000, 29999]} if kind == "nat" else {}
    nodes = {INGRESS: IngressNode(INGRESS, m, HASHER), EGRESS: EgressNode(EGRESS, m)}
    nodes.update({n: ServiceNode(n, m, create(kind, **options)) for n in members})
    return m, nodes


def _run(nodes, src, events, now, mirrors=True):
    """Carry a node's events through the group (mirrors applied unless told not to)."""
    for ev in events:
        if isinstance(ev, Send):
            _run(nodes, ev.to, nodes[ev.to].from_fabric(ev.data, src, now), now, mirrors)
        elif isinstance(ev, Mirror) and mirrors:
            nodes[ev.to].apply_update(ev.update, now)


def _open(nodes, now=1.0, mirrors=True):
    """A TCP connection opened (its SYN) from every port of PORTS."""
    for p in PORTS:
        _run(nodes, INGRESS, nodes[INGRESS].from_client(tcp(sport=p, flags="S", seq=1), now), now, mirrors)


def _mid_stream(nodes, now):
    """A mid-stream packet of every connection, twice (a lost flow counts once)."""
    for _ in range(2):
        for p in PORTS:
            _run(nodes, INGRESS, nodes[INGRESS].from_client(tcp(sport=p, flags="A", seq=2, ack=1), now), now)


def _led_by(m, nodes, dying):
    """(lost, replicated): the flows led by `dying` whose secondary is among
    them too, and those with a replica elsewhere."""
    lost = replicated = 0
    for name in dying:
        for e in nodes[name].flows:
            if not e.replica:
                if m.secondary("S", e.key[1], exclude=name) in dying:
                    lost += 1
                else:
                    replicated += 1
    return lost, replicated


def _publish(nodes, smap, dead, now, survivors):
    """A map with `dead` declared dead, installed by the survivors; returns it."""
    new = smap.copy()
    for n in dead:
        new.set_state(n, InstanceState.DEAD)
    for n in (INGRESS, EGRESS, *survivors):
        nodes[n].update_map(new, now)
    return new


def _lost(nodes, members):
    return sum(nodes[n].counters["flows_lost"] for n in members)


@pytest.mark.parametrize("kind", KINDS)
def test_flows_lost_counts_exactly_the_flows_of_a_double_failure(kind):
    """Every service: after its instances s1 and s2 die together, a flow
    whose primary and secondary were both among them is lost (its state is
    nowhere), counted once by the instance that gets its next packets; a
    flow with a surviving replica is not."""
    m, nodes = _group(kind)
    _open(nodes)
    lost, replicated = _led_by(m, nodes, ("s1", "s2"))
    assert lost > 5 and replicated > 5
    _publish(nodes, m, ("s1", "s2"), 1.5, ("s3",))
    _mid_stream(nodes, 2.0)
    assert nodes["s3"].counters["flows_lost"] == lost


@pytest.mark.parametrize("kind", KINDS)
def test_flows_lost_counts_a_double_failure_published_as_two_epochs(kind):
    """The controller declares each death in an epoch of its own, a few ms
    apart: s3, made secondary of s1's buckets by the first, leads them by
    the second, before any bulk could reach it (s2 was dead already). Their
    flows are lost all the same, and counted."""
    m, nodes = _group(kind)
    _open(nodes)
    lost, _ = _led_by(m, nodes, ("s1", "s2"))
    first = _publish(nodes, m, ("s1",), 1.5, ("s3",))
    _publish(nodes, first, ("s2",), 1.505, ("s3",))
    _mid_stream(nodes, 2.0)
    assert nodes["s3"].counters["flows_lost"] == lost


@pytest.mark.parametrize("kind", KINDS)
def test_flows_lost_counts_packets_that_came_ahead_of_the_map(kind):
    """The ingress installs the map of the double failure and reroutes the
    flows' next packets to s3 before s3 has it (an inspection instance
    starts each flow over meanwhile): s3 counts them when the map comes."""
    m, nodes = _group(kind)
    _open(nodes)
    lost, _ = _led_by(m, nodes, ("s1", "s2"))
    dead = _publish(nodes, m, ("s1", "s2"), 1.5, ())
    _mid_stream(nodes, 1.6)
    assert nodes["s3"].counters["flows_lost"] == 0
    nodes["s3"].update_map(dead, 1.7)
    _mid_stream(nodes, 2.0)
    assert nodes["s3"].counters["flows_lost"] == lost


@pytest.mark.parametrize("kind", KINDS)
def test_flows_lost_does_not_count_a_single_failure(kind):
    """The control: s1 dies alone, and its flows' mirrors never reached its
    secondaries (as in the async policy's window), so their next packets
    find no state at the instances that take over. That is one failure, not
    two: the state's holders did not both die, and nothing is counted."""
    m, nodes = _group(kind)
    _open(nodes, mirrors=False)
    rerouted = [e.key for e in nodes["s1"].flows]
    assert len(rerouted) > 5 and not any(k in nodes[n].flows for k in rerouted for n in ("s2", "s3"))
    _publish(nodes, m, ("s1",), 1.5, ("s2", "s3"))
    _mid_stream(nodes, 2.0)
    assert _lost(nodes, ("s2", "s3")) == 0
    assert sum(nodes[n].counters["state_missing"] for n in ("s2", "s3")) >= len(rerouted)


@pytest.mark.parametrize("kind", KINDS)
def test_a_lost_flow_is_not_counted_again_after_a_later_failure(kind):
    """A flow lost in a double failure is counted by the instance that took
    its bucket over; when that instance dies too (later, alone), the next
    one does not count the flow again."""
    members = ("s1", "s2", "s3", "s4")
    m, nodes = _group(kind, members)
    _open(nodes)
    lost, _ = _led_by(m, nodes, ("s1", "s2"))
    assert lost > 5
    after = _publish(nodes, m, ("s1", "s2"), 1.5, ("s3", "s4"))
    _mid_stream(nodes, 2.0)
    assert _lost(nodes, ("s3", "s4")) == lost
    _publish(nodes, after, ("s3",), 3.0, ("s4",))
    _mid_stream(nodes, 3.5)
    assert _lost(nodes, ("s3", "s4")) == lost


def _orphaned_by_walk(node, orphans, since, old, new, now):
    """`ServiceNode._orphaned` as it was written first, bucket by bucket
    (the rule, readable): returns the new (orphans, since) for the state
    (orphans, since: bucket -> when made secondary) it is given."""
    from dataplane.core.node import SYNC_GRACE
    from dataplane.core.servicemap import NO_INSTANCE

    def roles(t):
        rows = [[t.names[i] if i != NO_INSTANCE else None for i in r] for r in t.ranks[:2]]
        return rows[0], rows[1] if len(rows) > 1 else [None] * len(rows[0])

    def holders_died(p, s, young):
        if p is None or new.is_alive(p):
            return False
        if not node.mirroring or s is None:
            return True
        return young if s == node.name else not new.is_alive(s)

    svc, me = node.service_name, node.name
    if old.table_inputs(svc) == new.table_inputs(svc):
        return orphans, since
    since = {b: t for b, t in since.items() if t > now - SYNC_GRACE}
    out = set()
    for b, (p0, s0, p1, s1) in enumerate(zip(*roles(old.table(svc)), *roles(new.table(svc)), strict=True)):
        if p1 == me:
            if (p0 == me and b in orphans) or (p0 != me and holders_died(p0, s0, b in since)):
                out.add(b)
        elif s1 == me and me not in (p0, s0):
            since[b] = now
    return out, since


def test_orphaned_buckets_are_those_of_the_bucket_by_bucket_rule():
    """`_orphaned` picks buckets by sets of them; through random map changes
    (deaths, double deaths a few ms apart, rejoins, drains, spares, hosts,
    one to three replicas, mirroring off) it finds exactly the orphans and
    young secondaries the rule finds bucket by bucket, and the runs reach
    every way to an orphan."""
    import random

    from dataplane.core.servicemap import Instance

    seen = Counter()
    for seed in range(40):
        rnd = random.Random(seed)
        names = [f"s{i}" for i in range(rnd.randint(2, 5))]
        m = ServiceMap(buckets=rnd.choice([64, 256]), replicas=rnd.choice([1, 2, 2, 3]))
        m.add_service("S", [Instance(n, host=rnd.choice(["", "h1", "h2"])) for n in names])
        nodes = {n: ServiceNode(n, m, create("firewall"), mirroring=rnd.random() < 0.8) for n in names}
        ref = {n: (set(), {}) for n in names}
        now, smap = 1.0, m
        for _ in range(30):
            new = smap.copy()
            for _ in range(rnd.choice([1, 1, 2])):
                new.set_state(rnd.choice(names), rnd.choice(list(InstanceState)))
            now += rnd.choice([0.002, 0.05, 0.3])
            for n, node in nodes.items():
                before = ref[n]
                ref[n] = orphans, since = _orphaned_by_walk(node, *before, smap, new, now)
                node._orphaned(smap, new, now)
                young: dict[int, float] = {}
                for t, bs in node._secondary_since:
                    for b in range(new.buckets):
                        if bs >> 8 * b & 1:
                            young[b] = max(young.get(b, t), t)
                assert node._orphans == orphans, (seed, n)
                assert young == since, (seed, n)
                seen["kept"] += bool(orphans & before[0])
                seen["young"] += bool(orphans & set(before[1]) - before[0])
                seen["not mirrored"] += bool(orphans - before[0]) and not node.mirroring
                seen["mirrored"] += bool(orphans - before[0]) and node.mirroring
            smap = new
    assert min(seen.values()) > 3 and len(seen) == 4, seen


def test_a_map_with_another_bucket_count_is_refused_loudly():
    """A bucket names the same flows only within one bucket count: a map
    with another count cannot be compared bucket by bucket with the one
    held, so judging its orphans raises instead of reading one table's
    buckets against the other's."""
    old = lab_map()
    node = ServiceNode("ba", old, create("firewall"))
    other = ServiceMap(buckets=old.buckets // 2)
    for svc, insts in old.services.items():
        other.add_service(svc, list(insts))
    other.set_state("bb", InstanceState.DEAD)
    with pytest.raises(ValueError, match=f"bucket count changed from {old.buckets} to {old.buckets // 2}"):
        node._orphaned(old, other, 1.0)


# -- maps of the same epoch, replies, ICMP errors on their flow's pins ------------------------


def test_a_map_of_the_same_epoch_is_not_installed():
    """Only a newer epoch installs: a map of the held epoch is refused and
    counted, and the ingress keeps classifying with the map it holds."""
    mesh = Mesh()
    same = lab_map()
    same.add_chain(Chain(2, 1, ["B"], [9000]))
    same.epoch = mesh.map.epoch
    for name in (INGRESS, EGRESS, "aa", "ba"):
        node = mesh.nodes[name]
        assert not node.update_map(same, 0.0)
        assert node.map is mesh.map and node.counters["stale_map"] == 1
        assert node.counters["map_updates"] == 0
    assert mesh.nodes[INGRESS].classifier.map is mesh.map


def _rejecting_b(reject: int) -> tuple[ServiceMap, ServiceNode, int]:
    m = lab_map()
    node = ServiceNode("ba", m, create("firewall", reject_ports=[reject]))
    return m, node, codes_led_by(m, "ba")[0]


def test_a_rejected_forward_packet_is_answered_back_upstream_as_a_reply():
    """The firewall's RST for a rejected SYN goes back to the instance the
    SYN came from, as a reply (REVERSE) one position on; each reject is
    counted once as a drop and once as replied."""
    m, node, code = _rejecting_b(8080)
    syn = tcp(dport=8080, flags="S", seq=77)
    data = wire.pack(1, 1, code, 1, m.epoch, ttl=9) + syn
    for i in (1, 2):
        out = node.from_fabric(data, "aa", 0.0)
        assert [type(e) for e in out] == [Drop, Send] and out[0].reason == "policy_rejected"
        assert out[1].to == "aa"
        h = wire.decode(out[1].data)
        assert (h.chain, h.index, h.code, h.client, h.epoch) == (1, 1, code, 1, m.epoch)
        assert h.flags == wire.Flags.REVERSE and h.length == 20
        assert node.drops["policy_rejected"] == i and node.counters["replied"] == i
    assert node.counters["forwarded"] == 0 and len(node.flows) == 0


def test_a_rejected_reply_direction_syn_is_answered_toward_the_egress():
    """A SYN coming up the chain (REVERSE) to a rejected port is answered
    the other way: toward the egress, not REVERSE, at the index the egress
    takes (0 from the chain's last service)."""
    m, node, code = _rejecting_b(40000)
    syn = tcp("10.2.0.10", "10.1.0.10", 80, 40000, "S", seq=5)
    data = wire.pack(1, 2, code, 1, m.epoch, wire.Flags.REVERSE) + syn
    out = node.from_fabric(data, EGRESS, 0.0)
    assert [type(e) for e in out] == [Drop, Send] and out[1].to == EGRESS
    h = wire.decode(out[1].data)
    assert (h.index, h.flags, h.code, h.epoch) == (0, 0, code, m.epoch)
    egress = EgressNode(EGRESS, m)
    [delivered] = egress.from_fabric(out[1].data, "ba", 0.0)
    assert isinstance(delivered, Deliver)


def test_a_rejected_packet_without_a_sender_is_only_dropped():
    """With no upstream node to answer (src None) the reject is a drop."""
    m, node, code = _rejecting_b(8080)
    out = node.from_fabric(wire.pack(1, 1, code, 1, m.epoch) + tcp(dport=8080, flags="S"), None, 0.0)
    assert out == [Drop("policy_rejected")]
    assert node.drops["policy_rejected"] == 1 and node.counters["replied"] == 0


class Judge:
    """A service that forwards every packet of a flow it holds and records
    what it is asked; an ICMP error gets `error_verdict` when one is set.
    With `translate`, its flows' replies carry the tuple of `translated`."""

    name = "judge"
    max_timeout = 60.0

    def __init__(self, error_verdict=None, translated=None) -> None:
        self.error_verdict = error_verdict
        self.calls: list[tuple[bool, bool, object, float]] = []
        if translated is not None:
            self.translated = lambda state: translated
            self.attach = lambda index, count, taken: None

    def process(self, pkt, forward, state, now):
        from dataplane.core.services import FORWARD, Action, Verdict
        self.calls.append((pkt.icmp_error is not None, forward, state, now))
        if pkt.icmp_error is not None and self.error_verdict is not None:
            return self.error_verdict, state
        if pkt.icmp_error is not None:
            return FORWARD, state
        return (FORWARD, state) if state else (Verdict(Action.FORWARD, mirror=True), "held")

    def encode_state(self, state):
        return b""

    def decode_state(self, data):
        return "held"


SERVER = "10.2.0.10"


def _abc(**judge) -> tuple[ServiceMap, dict, int, dict[str, str]]:
    """ingress -> A -> B -> C -> egress (two `Judge` instances each), a UDP
    flow opened through it; returns its code and the instance of each service."""
    m = ServiceMap(buckets=256)
    m.add_service(INGRESS, [INGRESS])
    for s in "ABC":
        m.add_service(s, [s.lower() + "1", s.lower() + "2"])
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "t1", ["10.1.0.0/16"]))
    m.add_chain(Chain(1, 1, ["A", "B", "C"]))
    nodes = {INGRESS: IngressNode(INGRESS, m, HASHER), EGRESS: EgressNode(EGRESS, m)}
    nodes.update({f"{s}{i}": ServiceNode(f"{s}{i}", m, Judge(**judge)) for s in "abc" for i in (1, 2)})
    code = HASHER.code_of(1, "10.1.0.10", 5000, SERVER, 53, 17)
    _run(nodes, INGRESS, nodes[INGRESS].from_client(udp(), 0.0), 0.0)
    via = {s: m.primary(s, code) for s in "ABC"}
    assert all(len(nodes[via[s]].flows) == 1 for s in "ABC")
    return m, nodes, code, via


def _unreachable(src=SERVER, dst="10.1.0.10") -> bytes:
    """Port unreachable from the server side about the flow's query."""
    from scapy.layers.inet import ICMP, IP
    from scapy.packet import Raw
    return bytes(IP(src=src, dst=dst) / ICMP(type=3, code=3) / Raw(udp()[:28]))


def _frag_needed() -> bytes:
    """Frag needed from the client side about the server's answer."""
    from scapy.layers.inet import ICMP, IP
    from scapy.packet import Raw
    answer = udp(SERVER, "10.1.0.10", 53, 5000)
    return bytes(IP(src="10.1.0.10", dst=SERVER) / ICMP(type=3, code=4, nexthopmtu=1400) / Raw(answer[:28]))


def _error_at(node, code, epoch, index, reverse, err, src, now=1.0, ttl=9):
    gso = wire.pack_gso(1, 1, 54, 1448, 34, 16)
    flags = wire.Flags.REVERSE if reverse else 0
    data = wire.pack(1, index, code, 1, epoch, flags, ttl=ttl, words=5 + len(gso) // 4) + gso + err
    return node.from_fabric(data, src, now), data


def test_icmp_errors_follow_their_flows_pins_at_every_position_with_a_fresh_header():
    """An error about a held flow goes where the flow's next packet in its
    direction would: the pinned instance of the next service, the ingress
    from the first, the egress from the last; its header one index on, the
    TTL one less, the node's epoch, options kept; counted per error."""
    m, nodes, code, via = _abc()
    a, b, c = (nodes[via[s]] for s in "ABC")
    cases = [(b, 2, True, _unreachable(), via["C"], via["A"]),
             (a, 1, True, _unreachable(), via["B"], INGRESS),
             (b, 2, False, _frag_needed(), via["A"], via["C"]),
             (c, 1, False, _frag_needed(), via["B"], EGRESS)]
    for node, index, reverse, err, src, to in cases:
        sent = node.counters["forwarded"]
        for i in (1, 2):
            out, data = _error_at(node, code, m.epoch + 1, index, reverse, err, src)
            assert len(out) == 1 and out[0].to == to
            h = wire.decode(out[0].data)
            assert (h.chain, h.index, h.code, h.client, h.epoch) == (1, index - 1, code, 1, m.epoch)
            assert (h.flags, h.ttl, h.length) == ((wire.Flags.REVERSE if reverse else 0), 8, 32)
            assert out[0].data[20:] == data[20:]
        assert node.counters["forwarded"] == sent + 2
    assert b.counters["icmp_related"] == 4 and a.counters["icmp_related"] == 2
    assert b.service.calls[-4:] == [(True, False, "held", 1.0)] * 2 + [(True, True, "held", 1.0)] * 2


def test_icmp_errors_whose_pin_died_take_the_next_services_primary_rerouted():
    """A dead pin is not followed: the error goes to the map's current
    primary of the next service in its direction, marked REROUTED; with no
    instance left (the ingress dead) it is dropped as `no_instance`."""
    m, nodes, code, via = _abc()
    dead = m.copy()
    for s in "ABC":
        dead.set_state(via[s], InstanceState.DEAD)
    dead.set_state(INGRESS, InstanceState.DEAD)
    a, b = nodes[via["A"]], nodes[via["B"]]
    for node in (a, b):
        node.update_map(dead, 0.5)
    cases = [(a, 3, False, _frag_needed(), "A", "B"), (b, 2, True, _unreachable(), "B", "A"),
             (b, 2, False, _frag_needed(), "B", "C")]
    for node, index, reverse, err, _, service in cases:
        out, _ = _error_at(node, code, dead.epoch, index, reverse, err, INGRESS)
        assert [e.to for e in out] == [dead.primary(service, code)] != [via[service]]
        h = wire.decode(out[0].data)
        assert h.flags == (wire.Flags.REVERSE if reverse else 0) | wire.Flags.REROUTED
    out, _ = _error_at(a, code, dead.epoch, 1, True, _unreachable(), via["B"])
    assert out == [Drop("no_instance")] and a.drops["no_instance"] == 1


def test_an_icmp_error_is_dropped_with_the_services_reason_or_as_unrelated():
    """An error the service does not let pass is dropped with its reason;
    one about no held flow is `icmp_unrelated` even when the service would
    pass it."""
    from dataplane.core.services import Action, Verdict
    m, nodes, code, via = _abc(error_verdict=Verdict(Action.DROP, "blocked"))
    b = nodes[via["B"]]
    out, _ = _error_at(b, code, m.epoch, 2, True, _unreachable(), via["C"])
    assert out == [Drop("blocked")] and b.drops["blocked"] == 1
    other = ServiceNode(via["B"], m, Judge())                              # holds no flow
    out, _ = _error_at(other, code, m.epoch, 2, True, _unreachable(), via["C"])
    assert out == [Drop("icmp_unrelated")] and other.drops["icmp_unrelated"] == 1


def test_a_reply_direction_icmp_error_finds_a_translated_flow_by_its_public_tuple():
    """Behind a translating service the server quotes the flow's public
    tuple: the error is matched through the index of translated tuples; an
    error quoting the flow's own tuple (not in the index) still finds it."""
    from dataplane.core.node import flow_key
    from dataplane.core.packet import parse
    from scapy.layers.inet import ICMP, IP
    from scapy.packet import Raw
    public = udp("198.51.100.7", SERVER, 20001, 53)
    tup = flow_key(0, 0, parse(public))[0][2:]
    m, nodes, code, via = _abc(translated=tup)
    b = nodes[via["B"]]
    err = bytes(IP(src=SERVER, dst="198.51.100.7") / ICMP(type=3, code=3) / Raw(public[:28]))
    out, _ = _error_at(b, code, m.epoch, 2, True, err, via["C"])
    assert [e.to for e in out] == [via["A"]]
    out, _ = _error_at(b, code, m.epoch, 2, True, _unreachable(), via["C"])
    assert [e.to for e in out] == [via["A"]]
    assert b.counters["icmp_related"] == 2


def test_a_newer_map_is_installed_and_said_so():
    """`update_map` answers whether it installed the map, on every node."""
    mesh = Mesh()
    newer = mesh.map.copy()
    newer.set_state("bc", InstanceState.DRAINING)
    for name in (INGRESS, EGRESS, "aa", "ba"):
        assert mesh.nodes[name].update_map(newer, 0.0)
        assert mesh.nodes[name].map is newer and mesh.nodes[name].counters["map_updates"] == 1
    assert mesh.nodes[INGRESS].classifier.map is newer


def test_a_packet_without_state_outside_an_orphaned_bucket_counts_once_as_state_missing():
    """A single failure: each mid-stream packet that finds no state is
    counted once as `state_missing`, and no flow as lost."""
    m = pair_map()
    node = ServiceNode("ba", m, create("firewall"))
    code = codes_led_by(m, "ba")[0]
    ack = wire.pack(1, 1, code, 1, m.epoch) + tcp(flags="A", seq=2, ack=1)
    node.from_fabric(ack, INGRESS, 0.0)
    assert node.counters["state_missing"] == 1
    node.from_fabric(ack, INGRESS, 0.0)
    assert node.counters["state_missing"] == 2 and node.counters["flows_lost"] == 0


def _lost_ports(m, nodes, dying=("s1", "s2")) -> list[int]:
    """Client ports of the flows whose primary and secondary both die."""
    return sorted(e.key[4] for name in dying for e in nodes[name].flows
                  if not e.replica and m.secondary("S", e.key[1], exclude=name) in dying)


def _ack(nodes, port, now):
    _run(nodes, INGRESS, nodes[INGRESS].from_client(tcp(sport=port, flags="A", seq=2, ack=1), now), now)


def test_lost_flows_are_remembered_up_to_a_bound_oldest_forgotten_first(monkeypatch):
    """Past LOST_MEMORY lost flows the oldest is forgotten first: a packet
    of a remembered flow is not counted again, one of a forgotten flow is."""
    import dataplane.core.node as node_module
    monkeypatch.setattr(node_module, "LOST_MEMORY", 2)
    m, nodes = _group("firewall")
    _open(nodes)
    f1, f2, f3 = _lost_ports(m, nodes)[:3]
    _publish(nodes, m, ("s1", "s2"), 1.5, ("s3",))
    s3 = nodes["s3"]
    for port, lost in ((f1, 1), (f2, 2), (f3, 3), (f2, 3), (f1, 4)):
        _ack(nodes, port, 2.0)
        assert s3.counters["flows_lost"] == lost, port


def test_packets_ahead_of_the_map_are_held_up_to_a_bound_oldest_forgotten_first(monkeypatch):
    """Flows whose packets came ahead of their map are remembered up to
    LOST_MEMORY, the oldest forgotten first: when the map comes, only the
    remembered ones are counted lost."""
    import dataplane.core.node as node_module
    monkeypatch.setattr(node_module, "LOST_MEMORY", 2)
    m, nodes = _group("firewall")
    _open(nodes)
    f1, f2, f3 = _lost_ports(m, nodes)[:3]
    dead = _publish(nodes, m, ("s1", "s2"), 1.5, ())
    for port in (f1, f2, f3):
        _ack(nodes, port, 1.6)
    nodes["s3"].update_map(dead, 1.7)
    assert nodes["s3"].counters["flows_lost"] == 2
    for port in (f2, f3):                      # remembered: counted already
        _ack(nodes, port, 2.0)
    assert nodes["s3"].counters["flows_lost"] == 2
    _ack(nodes, f1, 2.0)                       # forgotten while held: counted now
    assert nodes["s3"].counters["flows_lost"] == 3


def test_a_replica_expires_without_mirroring_a_delete():
    """Only the flows an instance leads mirror their delete on expiry; a
    replica that idles out goes silently."""
    prim, sec, upsert, _ = _udp_flow()
    assert sec.apply_update(upsert, 0.0)
    assert sec.expire(1000.0) == [] and len(sec.flows) == 0


def test_an_expired_flows_delete_goes_to_the_buckets_other_instance():
    """The delete of a flow a primary expires goes to the secondary of the
    flow's code; on an instance no longer primary of a flow it led, to the
    bucket's other instance, never to itself."""
    mesh = Mesh()
    for sport in range(40000, 40040):
        mesh.client(tcp(sport=sport, flags="S", seq=1))
    prim = mesh.nodes["ba"]
    want = {e.key: mesh.map.secondary("B", e.key[1], exclude="ba") for e in prim.flows if not e.replica}
    assert len(set(want.values())) == 2
    got = {ev.update.key: ev.to for ev in prim.expire(10_000.0)}
    assert got == want
    m, node, code = _rejecting_b(1)
    node.from_fabric(wire.pack(1, 1, code, 1, m.epoch) + udp(), "aa", 0.0)
    later = m.copy()
    later.set_state("ba", InstanceState.DRAINING)
    node.update_map(later, 1.0)
    assert later.primary("B", code) != "ba"
    [delete] = node.expire(10_000.0)
    assert delete.to == later.secondary("B", code, exclude="ba") != "ba"


def test_the_gso_option_says_whether_the_transport_checksum_was_left_to_the_receiver():
    """Only a well-formed GSO option with NEEDS_CSUM leaves the checksum
    unverified; no option, another option, or a malformed one says nothing."""
    from dataplane.core.node import NEEDS_CSUM, _checksum_left
    assert _checksum_left(wire.pack_gso(NEEDS_CSUM, 1, 54, 1448, 34, 16))
    assert not _checksum_left(wire.pack_gso(0, 1, 54, 1448, 34, 16))
    assert not _checksum_left(b"\x00\x00\x00\x00")           # padding: no GSO option
    assert not _checksum_left(bytes([1, 40]) + bytes(10))     # runs past the header


def test_fragments_are_counted_held_then_reassembled_and_an_unparsable_whole_is_dropped():
    """Each held fragment is counted, each completed datagram once; a
    datagram the fragments complete is parsed, and one the parser refuses
    is a counted drop at the edge."""
    from scapy.layers.inet import IP, fragment
    from scapy.packet import Raw
    ing = Mesh().nodes[INGRESS]
    cut = IP(src="10.1.0.10", dst="10.2.0.10", proto=6) / Raw(bytes(64))   # TCP header, data offset 0
    pieces = [bytes(f) for f in fragment(cut, fragsize=24)]
    assert len(pieces) == 3
    for i, p in enumerate(pieces[:-1], 1):
        assert ing.from_client(p, 0.0) == [] and ing.counters["frag_held"] == i
    out = ing.from_client(pieces[-1], 0.0)
    assert out == [Drop(out[0].reason)] and ing.drops[out[0].reason] == 1
    assert ing.counters["reassembled"] == 1 and ing.counters["frag_held"] == 2
    ok = [bytes(f) for f in fragment(IP(bytes(udp(payload=b"u" * 1400))), fragsize=800)]
    ing.from_client(ok[0], 0.0)
    assert [type(e) for e in ing.from_client(ok[1], 0.0)] == [Send]
    assert ing.counters["reassembled"] == 2 and ing.counters["frag_held"] == 3


def test_a_flow_deleted_again_moves_to_the_young_end_of_the_tombstones():
    """Tombstones are kept oldest delete first: a flow deleted again (a
    newer version) counts from its last delete, so an older tombstone of
    another flow is forgotten before it, on time and past the capacity."""
    from dataclasses import replace
    prim, sec, up1, _ = _udp_flow(sport=5001)
    _, _, up2, _ = _udp_flow(sport=5002)
    top = sec.service.max_timeout
    sec.apply_update(replace(up1, version=2, deleted=True, state=b""), 0.0)
    sec.apply_update(replace(up2, version=2, deleted=True, state=b""), 10.0)
    sec.apply_update(replace(up1, version=4, deleted=True, state=b""), 20.0)
    sec.expire(15.0 + top)                       # past the second delete, not the third
    assert sec.apply_update(replace(up2, version=1), 15.0 + top)      # forgotten
    assert not sec.apply_update(replace(up1, version=3), 15.0 + top)  # still buried


def test_tombstones_past_the_capacity_are_each_counted():
    flows = [_udp_flow(capacity=2, sport=5000 + i) for i in range(4)]
    _, sec, _, _ = flows[0]
    for prim, _, _, _ in flows:
        [delete] = prim.expire(1000.0)
        sec.apply_update(delete.update, 1000.0)
    assert sec.counters["tombstones_dropped"] == 2


def test_an_evicted_flows_tombstone_lasts_the_longest_timeout():
    """The tombstone an eviction leaves is dated at the eviction: expiry
    forgets it after the service's longest timeout like any other."""
    prim, sec, upsert, packet = _udp_flow(capacity=2)
    code = codes_led_by(prim.map, "ba")[0]
    for sport in (5998, 5999):
        prim.from_fabric(wire.pack(1, 1, code, 1, prim.map.epoch) + udp(sport=sport), INGRESS, 0.1)
    assert upsert.key in prim._tombstones
    prim._forget_tombstones(0.1 + prim.service.max_timeout - 1)
    assert upsert.key in prim._tombstones
    prim._forget_tombstones(0.1 + prim.service.max_timeout)
    assert upsert.key not in prim._tombstones


def _nat(ports=(20000, 20001)):
    m = pair_map()
    return m, ServiceNode("ba", m, create("nat", pool=["198.51.100.7"], ports=list(ports)))


def test_a_nat_tuple_of_an_expired_flow_is_free_again():
    """A public port held by a flow is not given to another (`nat_exhausted`
    when it is the last); once that flow expired the port is free."""
    m, node = _nat()                    # one port for each of the two instances
    code = codes_led_by(m, "ba")[0]
    first, second = (wire.pack(1, 1, code, 1, m.epoch) + udp(sport=p) for p in (5001, 5002))
    assert isinstance(node.from_fabric(first, INGRESS, 0.0)[-1], Send)
    assert node.from_fabric(second, INGRESS, 1.0)[-1] == Drop("nat_exhausted")
    node.expire(500.0)
    assert len(node.flows) == 0
    assert isinstance(node.from_fabric(second, INGRESS, 501.0)[-1], Send)


def test_the_index_of_translated_tuples_is_compacted_past_twice_the_flows_plus_1024():
    """Expired flows leave their translated tuples in the index; a new flow
    compacts it when it holds more than 2 x flows + 1024 tuples, keeping
    the tuples of the flows held (one opened later than the expired ones)."""
    for stale, sizes in ((1027, [1029, 1030]), (1028, [2, 3])):
        m, node = _nat((20000, 29999))
        code = codes_led_by(m, "ba")[0]
        head, query = wire.pack(1, 1, code, 1, m.epoch), udp()
        for p in range(stale):        # the query from another client port (the NAT reads no checksum)
            node.from_fabric(head + query[:20] + (1000 + p).to_bytes(2, "big") + query[22:], INGRESS, 0.0)
        node.from_fabric(head + udp(sport=60000), INGRESS, 400.0)
        node.expire(500.0)
        assert len(node.flows) == 1 and len(node._by_translated) == stale + 1
        got = []
        for p in (60001, 60002):
            node.from_fabric(head + udp(sport=p), INGRESS, 501.0)
            got.append(len(node._by_translated))
        assert got == sizes, stale
        for e in node.flows:
            assert node._by_translated[node.service.translated(e.state)] == e.key


def test_the_edges_take_only_packets_at_the_end_of_the_chain_in_their_direction():
    """The ingress delivers only replies (REVERSE) at index 0, the egress
    only forward packets at index 0; anything else is `bad_index`."""
    mesh = Mesh()
    ing, eg = mesh.nodes[INGRESS], mesh.nodes[EGRESS]
    rev = wire.Flags.REVERSE
    for node, flags, index in ((ing, 0, 0), (ing, rev, 1), (eg, rev, 0), (eg, 0, 1)):
        assert node.from_fabric(wire.pack(1, index, 5, 1, 1, flags) + udp(), "ba", 0.0) == [Drop("bad_index")]
    assert ing.drops["bad_index"] == 2 and eg.drops["bad_index"] == 2
    assert [type(e) for e in ing.from_fabric(wire.pack(1, 0, 5, 1, 1, rev) + udp(), "aa", 0.0)] == [Deliver]
    assert [type(e) for e in eg.from_fabric(wire.pack(1, 0, 5, 1, 1) + udp(), "ba", 0.0)] == [Deliver]


def test_packets_handed_in_without_options_get_a_bare_header():
    """`options` defaults to none: both edges then send a 20-byte header
    with the packet right behind it."""
    mesh = Mesh()
    ing, eg = mesh.nodes[INGRESS], mesh.nodes[EGRESS]
    [sent] = ing.from_client(udp(), 0.0)
    assert wire.decode(sent.data).length == 20 and sent.data[20:] == udp()
    eg.from_fabric(wire.pack(1, 0, 5, 1, 1) + udp(), "ba", 0.0)
    answer = udp("10.2.0.10", "10.1.0.10", 53, 5000)
    [sent] = eg.from_server(answer, 0.0)
    assert wire.decode(sent.data).length == 20 and sent.data[20:] == answer


def test_a_service_node_refuses_a_name_outside_the_map_or_a_zero_embryonic_cap():
    m = pair_map()
    with pytest.raises(ValueError, match="^instance 'zz' is not in the service map$"):
        ServiceNode("zz", m, create("firewall"))
    with pytest.raises(ValueError, match="^embryonic_per_tenant must be at least 1$"):
        ServiceNode("ba", m, create("firewall"), embryonic_per_tenant=0)
    assert ServiceNode("ba", m, create("firewall"), embryonic_per_tenant=1).embryonic_per_tenant == 1


def test_the_exact_match_cache_is_on_by_default_and_never_for_a_rewriting_service():
    """By default a flow's next packet takes the exact-match cache; a
    service that rewrites packets never does, even one offering `fast`,
    so every packet of it is rewritten."""
    m = pair_map()
    code = codes_led_by(m, "ba")[0]
    data = wire.pack(1, 1, code, 1, m.epoch) + udp()
    plain = ServiceNode("ba", m, create("passthrough"))
    for _ in range(2):
        plain.from_fabric(data, INGRESS, 0.0)
    assert plain.counters["fast_path"] == 1

    class Stamp(type(create("passthrough"))):
        def rewrite(self, state, forward, packet):
            return packet + b"!"

    stamping = ServiceNode("ba", m, Stamp())
    for _ in range(3):
        [sent] = [e for e in stamping.from_fabric(data, INGRESS, 0.0) if isinstance(e, Send)]
        assert sent.data.endswith(b"!")
    assert stamping.counters["fast_path"] == 0


def test_a_flow_of_its_own_that_comes_back_rerouted_is_handed_to_the_services_moved_hook():
    """A packet marked REROUTED for a flow this instance already leads (it
    came back after a failover elsewhere) goes through the service's
    `moved` hook, counted as `came_back`."""
    m = pair_map()
    node = ServiceNode("ba", m, create("firewall"))
    code = codes_led_by(m, "ba")[0]
    head = wire.pack(1, 1, code, 1, m.epoch)
    node.from_fabric(head + udp(), INGRESS, 0.0)
    node.from_fabric(head + udp(), INGRESS, 0.1)
    assert node.counters["came_back"] == 0
    node.from_fabric(wire.pack(1, 1, code, 1, m.epoch, wire.Flags.REROUTED) + udp(), INGRESS, 0.2)
    assert node.counters["came_back"] == 1


def test_a_replys_header_options_reach_the_client_side_whole():
    """A GSO option the egress puts on a reply comes out of the ingress
    with the packet, byte for byte."""
    mesh = Mesh()
    gso = wire.pack_gso(1, 1, 54, 1448, 34, 16)
    mesh.client(tcp(flags="S", seq=1))
    mesh.server(tcp("10.2.0.10", "10.1.0.10", 80, 40000, "SA", seq=9, ack=2), options=gso)
    assert mesh.options == [b"", gso]
    assert mesh.delivered[INGRESS] == [tcp("10.2.0.10", "10.1.0.10", 80, 40000, "SA", seq=9, ack=2)]


def test_the_edges_count_each_packet_they_encapsulate_and_each_related_error():
    """Every packet an edge sends into the chain is counted `encapsulated`,
    every ICMP error it passes for a flow `icmp_related`, one each."""
    from scapy.layers.inet import ICMP, IP
    from scapy.packet import Raw
    mesh = Mesh()
    ing, eg = mesh.nodes[INGRESS], mesh.nodes[EGRESS]
    answer = udp("10.2.0.10", "10.1.0.10", 53, 5000)
    for _ in range(2):
        mesh.client(udp())
        mesh.server(answer)
    unreachable = bytes(IP(src="10.2.0.10", dst="10.1.0.10") / ICMP(type=3, code=3) / Raw(udp()[:28]))
    frag_needed = bytes(IP(src="10.1.0.10", dst="10.2.0.10") / ICMP(type=3, code=4) / Raw(answer[:28]))
    for _ in range(2):
        mesh.server(unreachable)
        mesh.client(frag_needed)
    assert (ing.counters["encapsulated"], eg.counters["encapsulated"]) == (4, 4)
    assert (ing.counters["icmp_related"], eg.counters["icmp_related"]) == (2, 2)
    assert mesh.delivered[INGRESS][-1] == unreachable and mesh.delivered[EGRESS][-1] == frag_needed


def test_an_edge_flow_idles_out_counted_from_its_hosts_last_packet():
    """The ingress's flow is kept alive by its client's packets, the
    egress's by its server's: each expires EDGE_TIMEOUT after the last."""
    from dataplane.core.node import EDGE_TIMEOUT
    mesh = Mesh()
    ing, eg = mesh.nodes[INGRESS], mesh.nodes[EGRESS]
    mesh.client(udp(), now=0.0)
    mesh.client(udp(), now=100.0)
    mesh.server(udp("10.2.0.10", "10.1.0.10", 53, 5000), now=300.0)
    assert [e.packets for e in eg.flows] == [2]              # the client's two, counted on one entry
    assert ing.flows.expire(100.0 + EDGE_TIMEOUT - 1, EDGE_TIMEOUT) == [] and len(ing.flows) == 1
    assert len(ing.flows.expire(100.0 + EDGE_TIMEOUT, EDGE_TIMEOUT)) == 1
    assert eg.flows.expire(300.0 + EDGE_TIMEOUT - 1, EDGE_TIMEOUT) == [] and len(eg.flows) == 1
    assert len(eg.flows.expire(300.0 + EDGE_TIMEOUT, EDGE_TIMEOUT)) == 1


def test_a_flow_its_server_answered_is_not_pushed_out_of_the_egress_by_new_ones():
    """The server's answer makes the egress's flow established, so a flood
    of new flows evicts the unanswered ones first."""
    eg = EgressNode(EGRESS, lab_map(), capacity=2)
    head = wire.pack(1, 0, 5, 1, 1)
    eg.from_fabric(head + udp(sport=5000), "ba", 0.0)
    eg.from_server(udp("10.2.0.10", "10.1.0.10", 53, 5000), 0.1)
    for sport in range(5001, 5005):
        eg.from_fabric(head + udp(sport=sport), "ba", 0.2)
    assert sorted(e.key[4] for e in eg.flows) == [5000, 5004]
    assert [type(e) for e in eg.from_server(udp("10.2.0.10", "10.1.0.10", 53, 5000), 0.3)] == [Send]


def test_an_edge_delivers_up_to_the_host_mtu_whole_and_refragments_only_bigger_ipv4():
    """At the host MTU exactly a packet (IPv4 or IPv6) is delivered whole;
    a bigger IPv4 datagram is re-fragmented (counted once per datagram); a
    super-frame with its GSO option is the host kernel's business, whole.
    Each is counted delivered once."""
    from scapy.layers.inet import IP
    from scapy.layers.inet import UDP as ScapyUDP
    from scapy.layers.inet6 import IPv6
    from scapy.packet import Raw
    eg = EgressNode(EGRESS, lab_map())
    head = wire.pack(1, 0, 5, 1, 1)
    v4 = bytes(IP(src="10.1.0.10", dst="10.2.0.10") / ScapyUDP(sport=1, dport=2) / Raw(bytes(1472)))
    v6 = bytes(IPv6(src="fd00:1::10", dst="fd00:2::10") / ScapyUDP(sport=1, dport=2) / Raw(bytes(1452)))
    assert len(v4) == len(v6) == 1500
    for whole, proto in ((v4, wire.NextProto.IPV4), (v6, wire.NextProto.IPV6)):
        out = eg.from_fabric(wire.pack(1, 0, 5, 1, 1, next_proto=proto) + whole, "ba", 0.0)
        assert out == [Deliver(whole, b"")]
    big = bytes(IP(src="10.1.0.10", dst="10.2.0.10") / ScapyUDP(sport=1, dport=2) / Raw(bytes(1972)))
    out = eg.from_fabric(head + big, "ba", 0.0)
    assert len(out) == 2 and all(isinstance(e, Deliver) and len(e.data) <= 1500 for e in out)
    gso = wire.pack_gso(1, 1, 28, 1472, 28, 6)
    out = eg.from_fabric(wire.pack(1, 0, 5, 1, 1, words=8) + gso + big, "ba", 0.0)
    assert out == [Deliver(big, gso)]
    assert eg.counters["delivered"] == 4 and eg.counters["refragmented"] == 1


def test_a_flow_whose_chain_left_the_map_is_dropped_at_both_edges_as_unknown_chain():
    """An edge's flow names its chain; once a newer map no longer has that
    chain, its packets from either host are dropped as `unknown_chain`."""
    mesh = Mesh()
    mesh.client(udp())
    answer = udp("10.2.0.10", "10.1.0.10", 53, 5000)
    mesh.server(answer)
    gone = mesh.map.copy()
    del gone.chains[1]
    gone.epoch += 1
    ing, eg = mesh.nodes[INGRESS], mesh.nodes[EGRESS]
    for node in (ing, eg):
        node.update_map(gone, 1.0)
    assert ing.from_client(udp(), 1.0) == [Drop("unknown_chain")]
    assert eg.from_server(answer, 1.0) == [Drop("unknown_chain")]
    assert ing.drops["unknown_chain"] == 1 and eg.drops["unknown_chain"] == 1


def test_an_edge_with_no_live_instance_of_its_neighbouring_service_drops_no_instance():
    """With every instance of the chain's first (last) service dead, the
    ingress (egress) has nowhere to send its host's packet: `no_instance`."""
    mesh = Mesh()
    mesh.client(udp())
    answer = udp("10.2.0.10", "10.1.0.10", 53, 5000)
    mesh.server(answer)
    dead = mesh.map.copy()
    for name in ("aa", "ab", "ba", "bb", "bc"):
        dead.set_state(name, InstanceState.DEAD)
    ing, eg = mesh.nodes[INGRESS], mesh.nodes[EGRESS]
    for node in (ing, eg):
        node.update_map(dead, 1.0)
    assert ing.from_client(udp(), 1.0) == [Drop("no_instance")]
    assert eg.from_server(answer, 1.0) == [Drop("no_instance")]
    assert ing.drops["no_instance"] == 1 and eg.drops["no_instance"] == 1


def test_a_client_error_about_its_own_flow_passes_the_tenant_check_on_any_chain():
    """The ingress compares the error sender's tenant with the flow's
    tenant (not its chain): a client's error about its own flow on a
    chain whose id is not the tenant's passes."""
    from scapy.layers.inet import ICMP, IP
    from scapy.packet import Raw
    mesh = Mesh()
    m = mesh.map
    m.add_chain(Chain(7, 1, ["B"], [9000]))
    query = udp(dport=9000)
    mesh.client(query)
    assert mesh.hops[0][2].chain == 7
    answer = udp("10.2.0.10", "10.1.0.10", 9000, 5000)
    mesh.server(answer)
    err = bytes(IP(src="10.1.0.10", dst="10.2.0.10") / ICMP(type=3, code=4) / Raw(answer[:28]))
    mesh.client(err)
    assert mesh.delivered[EGRESS][-1] == err and mesh.nodes[INGRESS].counters["icmp_related"] == 1


def test_the_egress_keeps_sending_a_flows_replies_to_its_draining_instance():
    """The egress's pin is the instance the flow came from; an instance
    being drained is alive and no longer primary, and every reply of its
    flows, one after another, still goes to it."""
    mesh = Mesh()
    mesh.client(udp())
    b = mesh.hops[1][1]
    drained = mesh.map.copy()
    drained.set_state(b, InstanceState.DRAINING)
    eg = mesh.nodes[EGRESS]
    eg.update_map(drained, 1.0)
    code = mesh.hops[0][2].code
    assert drained.is_alive(b) and drained.primary("B", code) != b
    answer = udp("10.2.0.10", "10.1.0.10", 53, 5000)
    for _ in range(3):
        [sent] = eg.from_server(answer, 1.0)
        assert sent.to == b and wire.decode(sent.data).flags == wire.Flags.REVERSE


def test_the_ingress_keeps_a_flow_on_its_draining_instance_and_counts_its_packets():
    """The ingress's pin holds while its instance drains (alive, no longer
    primary); the flow counts each client packet; a flow of one packet
    idles out EDGE_TIMEOUT after it."""
    from dataplane.core.node import EDGE_TIMEOUT
    mesh = Mesh()
    ing = mesh.nodes[INGRESS]
    ing.from_client(udp(sport=6000), 0.0)
    [sent] = ing.from_client(udp(), 0.0)
    a = sent.to
    drained = mesh.map.copy()
    drained.set_state(a, InstanceState.DRAINING)
    ing.update_map(drained, 1.0)
    assert drained.primary("A", wire.decode(sent.data).code) != a
    for _ in range(2):
        [sent] = ing.from_client(udp(), 1.0)
        assert sent.to == a and wire.decode(sent.data).flags == 0
    [flow] = [e for e in ing.flows if e.key[4] == 5000]
    assert flow.packets == 3
    assert [e.key[4] for e in ing.flows.expire(EDGE_TIMEOUT, EDGE_TIMEOUT)] == [6000]


def test_the_ingress_marks_only_the_first_packet_after_its_pin_died_rerouted():
    """When the instance a client flow is pinned to dies, the ingress sends
    the next packet to the new primary marked REROUTED, the ones after it
    plain; the egress's flow is refreshed by each client packet."""
    from dataplane.core.node import EDGE_TIMEOUT
    mesh = Mesh()
    mesh.client(udp(), now=0.0)
    a = mesh.hops[0][1]
    mesh.kill(a)
    mesh.client(udp(), now=100.0)
    mesh.client(udp(), now=100.0)
    flags = [h.flags for src, _, h in mesh.hops if src == INGRESS]
    assert flags == [0, wire.Flags.REROUTED, 0]
    eg = mesh.nodes[EGRESS]
    assert eg.flows.expire(100.0 + EDGE_TIMEOUT - 1, EDGE_TIMEOUT) == [] and len(eg.flows) == 1


def test_a_one_packet_egress_flow_idles_out_edge_timeout_after_it():
    from dataplane.core.node import EDGE_TIMEOUT
    eg = EgressNode(EGRESS, lab_map())
    eg.from_fabric(wire.pack(1, 0, 5, 1, 1) + udp(), "ba", 10.0)
    assert eg.flows.expire(10.0 + EDGE_TIMEOUT - 1, EDGE_TIMEOUT) == []
    assert len(eg.flows.expire(10.0 + EDGE_TIMEOUT, EDGE_TIMEOUT)) == 1
