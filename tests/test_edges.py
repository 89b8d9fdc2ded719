"""Fragments and ICMP errors through the nodes (issue #14 findings 3 and 11).

The mesh: tenant 1 on 10.1.0.0/16; chain 1 = [A (inspection), B (firewall,
port 23 denied)] for every port but 9000, chain 2 = [B] for port 9000.
"""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.packet import Raw

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.core.defrag import Defrag
from dataplane.core.events import Deliver, Drop, Mirror, Send
from dataplane.core.node import EGRESS, INGRESS, EgressNode, IngressNode, ServiceNode
from dataplane.core.packet import parse
from dataplane.core.servicemap import Chain, ServiceMap, Tenant
from dataplane.core.services import create
from dataplane.core.services.firewall import Firewall
from tests.conftest import tcp, udp

HASHER = AffinityHasher(b"edge-tests")
CLIENT, SERVER = "10.1.0.10", "10.2.0.10"


def edge_map() -> ServiceMap:
    m = ServiceMap(buckets=256)
    m.add_service(INGRESS, [INGRESS])
    m.add_service("A", ["aa", "ab"])
    m.add_service("B", ["ba", "bb"])
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "t1", ["10.1.0.0/16"]))
    m.add_chain(Chain(1, 1, ["A", "B"]))
    m.add_chain(Chain(2, 1, ["B"], [9000]))
    return m


class Mesh:
    """The nodes of `edge_map` wired in memory; records hops and deliveries."""

    def __init__(self) -> None:
        m = edge_map()
        self.nodes = {INGRESS: IngressNode(INGRESS, m, HASHER), EGRESS: EgressNode(EGRESS, m)}
        for n in ("aa", "ab"):
            self.nodes[n] = ServiceNode(n, m, create("inspection"))
        for n in ("ba", "bb"):
            self.nodes[n] = ServiceNode(n, m, Firewall(deny_ports=[23]))
        self.hops: list[tuple[str, str, wire.Header]] = []
        self.delivered: dict[str, list[bytes]] = {INGRESS: [], EGRESS: []}
        self.dropped: list[tuple[str, str]] = []
        self.mirrors = 0

    def run(self, src: str, events: list, now: float = 0.0) -> None:
        for ev in events:
            if isinstance(ev, Send):
                self.hops.append((src, ev.to, wire.decode(ev.data)))
                self.run(ev.to, self.nodes[ev.to].from_fabric(ev.data, src, now), now)
            elif isinstance(ev, Deliver):
                self.delivered[src].append(ev.data)
            elif isinstance(ev, Drop):
                self.dropped.append((src, ev.reason))
            elif isinstance(ev, Mirror):
                self.mirrors += 1
                self.nodes[ev.to].apply_update(ev.update, now)

    def client(self, data: bytes, now: float = 0.0) -> None:
        self.run(INGRESS, self.nodes[INGRESS].from_client(data, now), now)

    def server(self, data: bytes, now: float = 0.0) -> None:
        self.run(EGRESS, self.nodes[EGRESS].from_server(data, now), now)

    def flows(self) -> int:
        return sum(len(n.flows) for n in self.nodes.values())


def frags(pkt, size: int = 600) -> list[bytes]:
    return [bytes(f) for f in fragment(pkt, fragsize=size)]


def whole(pieces: list[bytes]) -> bytes:
    d = Defrag(drops={})  # type: ignore[arg-type]
    out = [d.push(p, 0.0) for p in pieces]
    assert out[-1] is not None
    return out[-1]


# -- finding 3: fragments --------------------------------------------------------------------

def test_syn_with_mf_to_a_denied_port_is_dropped_like_an_unfragmented_one():
    control = Mesh()
    control.client(tcp(dport=23, flags="S"))
    assert control.dropped == [("ba", "policy_denied")] or control.dropped == [("bb", "policy_denied")]
    mesh = Mesh()
    syn = IP(src=CLIENT, dst=SERVER, id=41) / TCP(sport=40000, dport=23, flags="S") / Raw(b"x" * 1200)
    for piece in frags(syn):
        mesh.client(piece)
    assert [r for _, r in mesh.dropped] == ["policy_denied"]
    assert mesh.delivered[EGRESS] == []


def test_fragmented_udp_in_reverse_order_takes_the_chain_its_port_selects():
    mesh = Mesh()
    dgram = IP(src=CLIENT, dst=SERVER, id=42) / UDP(sport=5000, dport=9000) / Raw(bytes(range(256)) * 12)
    pieces = frags(dgram, 1000)
    for piece in reversed(pieces):
        mesh.client(piece)
    assert [h.chain for _, _, h in mesh.hops] == [2, 2]  # ingress -> B -> egress on chain 2
    assert [(a, b) for a, b, _ in mesh.hops][0][1] in ("ba", "bb")
    got = mesh.delivered[EGRESS]
    assert len(got) == 3 and all(len(p) <= 1500 for p in got)  # re-fragmented to the host MTU
    assert whole(got) == bytes(IP(bytes(dgram)))
    assert mesh.nodes[INGRESS].counters["reassembled"] == 1


def test_server_fragments_reach_the_client_through_the_flow():
    mesh = Mesh()
    mesh.client(udp(sport=5000, dport=53, payload=b"q"))
    reply = IP(src=SERVER, dst=CLIENT, id=43) / UDP(sport=53, dport=5000) / Raw(b"r" * 3000)
    for piece in frags(reply, 1000)[::-1]:
        mesh.server(piece)
    assert mesh.dropped == []
    assert whole(mesh.delivered[INGRESS]) == bytes(IP(bytes(reply)))


def test_ipv6_fragments_are_dropped_by_policy():
    mesh = Mesh()
    pkt = (IPv6(src="2001:db8::10", dst="2001:db8:2::10") / IPv6ExtHdrFragment(m=1, id=5)
           / UDP(sport=1, dport=9000) / Raw(b"x" * 64))
    mesh.client(bytes(pkt))
    assert mesh.dropped == [(INGRESS, "frag_unsupported")]


# -- finding 11: ICMP errors -----------------------------------------------------------------

def port_unreachable(quoted: bytes, src: str = SERVER, dst: str = CLIENT) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(type=3, code=3) / Raw(quoted[:28]))


def frag_needed(quoted: bytes, src: str, dst: str, mtu: int = 1400) -> bytes:
    return bytes(IP(src=src, dst=dst) / ICMP(type=3, code=4, nexthopmtu=mtu) / Raw(quoted[:28]))


def test_port_unreachable_about_a_live_flow_reaches_the_client_with_its_code():
    mesh = Mesh()
    query = udp(sport=5000, dport=53)
    mesh.client(query)
    flow_code = mesh.hops[0][2].code
    flows, mirrors = mesh.flows(), mesh.mirrors
    before = len(mesh.hops)
    err = port_unreachable(query)
    mesh.server(err)
    assert mesh.dropped == []
    assert mesh.delivered[INGRESS] == [err]
    assert {h.code for _, _, h in mesh.hops[before:]} == {flow_code}
    back = [(a, b) for a, b, _ in mesh.hops[before:]]
    fwd = [(b, a) for a, b, _ in mesh.hops[:before]][::-1]
    assert back == fwd  # the same instances, the other way
    assert (mesh.flows(), mesh.mirrors) == (flows, mirrors)  # no state made or mirrored
    assert sum(n.counters["icmp_related"] for n in mesh.nodes.values()) == 3  # egress, B, A


def test_frag_needed_from_the_client_side_reaches_the_server():
    mesh = Mesh()
    mesh.client(tcp(sport=40000, dport=80, flags="S", seq=1))
    synack = tcp(src=SERVER, dst=CLIENT, sport=80, dport=40000, flags="SA", seq=500, ack=2)
    mesh.server(synack)
    err = frag_needed(synack, CLIENT, SERVER)
    mesh.client(err)
    assert mesh.dropped == [] and mesh.delivered[EGRESS][-1] == err


def test_errors_about_unknown_flows_are_dropped_unrelated_everywhere():
    mesh = Mesh()
    mesh.client(udp(sport=5000, dport=53))
    mesh.server(port_unreachable(udp(sport=5001, dport=53)))               # no such flow
    mesh.server(port_unreachable(udp(sport=5000, dport=53), dst="10.1.0.99"))  # not to its sender
    mesh.client(frag_needed(udp(src=SERVER, dst=CLIENT, sport=53, dport=6000), CLIENT, SERVER))
    assert mesh.dropped == [(EGRESS, "icmp_unrelated"), (EGRESS, "icmp_unrelated"),
                            (INGRESS, "icmp_unrelated")]
    assert mesh.delivered[INGRESS] == [] and mesh.delivered[EGRESS] == [udp(sport=5000, dport=53)]


def test_a_client_cannot_send_errors_about_another_tenants_flow():
    mesh = Mesh()
    mesh.nodes[INGRESS].map.add_tenant(Tenant(2, "t2", ["10.3.0.0/16"]))
    mesh.client(tcp(sport=40000, dport=80, flags="S", seq=1))
    synack = tcp(src=SERVER, dst=CLIENT, sport=80, dport=40000, flags="SA", seq=500, ack=2)
    mesh.server(synack)
    mesh.client(frag_needed(synack, "10.3.0.7", SERVER))  # tenant 2 quoting tenant 1's flow
    assert mesh.dropped == [(INGRESS, "icmp_unrelated")] and mesh.delivered[EGRESS] == [tcp(seq=1)]


def test_service_instance_passes_only_errors_about_flows_it_holds():
    m = edge_map()
    ba = ServiceNode("ba", m, Firewall())
    code = HASHER.code_of(1, CLIENT, 5000, SERVER, 53, 17)
    head = wire.pack(2, 1, code, 1, m.epoch, 0)
    query = udp(sport=5000, dport=53)
    err = frag_needed(udp(src=SERVER, dst=CLIENT, sport=53, dport=5000), CLIENT, SERVER)
    assert ba.from_fabric(head + err, INGRESS, 0.0) == [Drop("icmp_unrelated")]
    assert len(ba.flows) == 0  # an error never opens a flow
    sent = ba.from_fabric(head + query, INGRESS, 0.0)
    assert isinstance(sent[-1], Send)
    out = ba.from_fabric(head + err, INGRESS, 1.0)
    assert len(out) == 1 and isinstance(out[0], Send) and out[0].to == EGRESS
    assert ba.counters["icmp_related"] == 1 and len(ba.flows) == 1


def test_error_code_is_the_quoted_flows_code():
    query = udp(sport=5000, dport=53)
    err = parse(port_unreachable(query))
    assert HASHER.code(1, err) == HASHER.code(1, parse(query))


def test_truncated_quote_is_a_counted_drop():
    mesh = Mesh()
    query = udp(sport=5000, dport=53)
    mesh.client(query)
    short = bytes(IP(src=SERVER, dst=CLIENT) / ICMP(type=3, code=3) / Raw(query[:24]))
    mesh.server(short)
    assert mesh.dropped == [(EGRESS, "icmp_bad_quote")]
    assert mesh.nodes[EGRESS].drops["icmp_bad_quote"] == 1


def test_firewall_and_inspection_judge_an_error_by_the_quoted_flows_state():
    query = udp(sport=5000, dport=53)
    err = parse(port_unreachable(query))
    fw = Firewall()
    assert fw.process(err, False, None, 0.0)[0].reason == "icmp_unrelated"
    _, st = fw.process(parse(query), True, None, 0.0)
    before = fw.encode_state(st)
    verdict, after = fw.process(err, False, st, 1.0)
    assert verdict.action == "forward" and not verdict.mirror and fw.encode_state(after) == before
    insp = create("inspection", rules=[{"name": "r", "pattern": "SECRET"}])
    assert insp.process(err, False, None, 0.0)[0].reason == "icmp_unrelated"
    _, ist = insp.process(parse(udp(sport=5000, dport=53, payload=b"SECRET")), True, None, 0.0)
    assert insp.process(err, False, ist, 1.0)[0].reason == "blocked"  # a blocked flow stays blocked
    _, ok = insp.process(parse(query), True, None, 0.0)
    packets = ok.packets
    assert insp.process(err, False, ok, 1.0)[0].action == "forward" and ok.packets == packets
