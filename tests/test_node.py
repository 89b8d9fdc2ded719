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
