"""Dual stack in the core (issue #15 item 3): IPv6 TCP, UDP and ICMPv6
through a whole chain of nodes, with the same affinity function as IPv4.

The mesh is `tests.test_edges.Mesh` with a tenant that owns an IPv6 prefix
too: chain 1 = [A (inspection), B (firewall, port 23 denied, 24 rejected)].
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest,
                                ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6PacketTooBig, IPv6)
from scapy.packet import Raw

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.core.node import EGRESS, INGRESS, EgressNode, IngressNode, ServiceNode
from dataplane.core.packet import link_local, parse, too_big
from dataplane.core.servicemap import Chain, ServiceMap, Tenant
from dataplane.core.services import create
from dataplane.core.services.firewall import Firewall
from tests import test_edges

CLIENT6, SERVER6 = "fd00:1::10", "fd00:2::10"
KAT_SECRET = b"affinity-mesh known answers"


def dual_map() -> ServiceMap:
    m = ServiceMap(buckets=256)
    m.add_service(INGRESS, [INGRESS])
    m.add_service("A", ["aa", "ab"])
    m.add_service("B", ["ba", "bb"])
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "t1", ["10.1.0.0/16", "fd00:1::/64"]))
    m.add_chain(Chain(1, 1, ["A", "B"]))
    return m


class Mesh(test_edges.Mesh):
    """`test_edges.Mesh` on the dual-stack map; `host_mtu` of the egress."""

    def __init__(self, host_mtu: int = 1500) -> None:
        super().__init__()
        m = dual_map()
        self.nodes = {INGRESS: IngressNode(INGRESS, m, test_edges.HASHER),
                      EGRESS: EgressNode(EGRESS, m, host_mtu=host_mtu)}
        for n in ("aa", "ab"):
            self.nodes[n] = ServiceNode(n, m, create("inspection", rules=[{"name": "x", "pattern": "SECRET"}]))
        for n in ("ba", "bb"):
            self.nodes[n] = ServiceNode(n, m, Firewall(deny_ports=[23], reject_ports=[24]))


def c2s(sport: int = 40000, dport: int = 80, flags: str = "S", seq: int = 1000, ack: int = 0,
        load: bytes = b"") -> bytes:
    return bytes(IPv6(src=CLIENT6, dst=SERVER6) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                                      ack=ack, window=64240) / Raw(load))


def s2c(dport: int = 40000, sport: int = 80, flags: str = "SA", seq: int = 5000, ack: int = 1001,
        load: bytes = b"") -> bytes:
    return bytes(IPv6(src=SERVER6, dst=CLIENT6) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                                      ack=ack, window=64240) / Raw(load))


def test_an_ipv6_tcp_connection_crosses_the_chain_both_ways_unchanged():
    mesh = Mesh()
    sent = [c2s(), None, c2s(flags="A", seq=1001, ack=5001),
            c2s(flags="PA", seq=1001, ack=5001, load=b"GET / HTTP/1.1\r\n\r\n")]
    mesh.client(sent[0])
    mesh.server(s2c())
    mesh.client(sent[2])
    mesh.client(sent[3])
    mesh.server(s2c(flags="PA", seq=5001, ack=1019, load=b"HTTP/1.1 200 OK\r\n\r\n"))
    assert mesh.dropped == []
    assert mesh.delivered[EGRESS] == [sent[0], sent[2], sent[3]]
    assert [IPv6(d)[TCP].flags for d in mesh.delivered[INGRESS]] == ["SA", "PA"]
    # every hop said what it carries, and the fabric hops of both directions share one code
    assert {h.next_proto for _, _, h in mesh.hops} == {wire.NextProto.IPV6}
    assert len({h.code for _, _, h in mesh.hops}) == 1
    fw = next(n for n in ("ba", "bb") if len(mesh.nodes[n].flows))
    st = next(iter(mesh.nodes[fw].flows)).state
    assert st.state == 3                                            # ESTABLISHED


def test_ipv6_tcp_policy_deny_reject_and_window_as_for_ipv4():
    mesh = Mesh()
    mesh.client(c2s(dport=23))
    assert [r for _, r in mesh.dropped] == ["policy_denied"]
    mesh = Mesh()
    mesh.client(c2s(dport=24))
    assert [r for _, r in mesh.dropped] == ["policy_rejected"]
    rst = IPv6(mesh.delivered[INGRESS][0])                          # answered back to the client
    assert rst.src == SERVER6 and rst[TCP].flags == "RA" and rst[TCP].ack == 1001
    want = rst[TCP].chksum
    del rst[TCP].chksum
    assert IPv6(bytes(rst))[TCP].chksum == want                      # a checksum the client accepts
    mesh = Mesh()
    mesh.client(c2s())
    mesh.server(s2c())
    mesh.client(c2s(flags="A", seq=1001 + (1 << 31), ack=5001))      # far outside the window
    assert [r for _, r in mesh.dropped] == ["out_of_window"]


def test_icmpv6_echo_is_a_pseudo_connection_and_an_unsolicited_reply_is_refused():
    mesh = Mesh()
    req = bytes(IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest(id=77, seq=1, data=b"ping"))
    rep = bytes(IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6EchoReply(id=77, seq=1, data=b"ping"))
    mesh.client(req)
    mesh.server(rep)
    assert mesh.dropped == [] and mesh.delivered == {EGRESS: [req], INGRESS: [rep]}
    stray = Mesh()
    stray.client(bytes(IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoReply(id=78, seq=1)))
    assert [r for _, r in stray.dropped] == ["misdelivery"]


def test_icmpv6_errors_are_related_to_the_flow_they_quote():
    mesh = Mesh()
    dgram = bytes(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=5000, dport=53) / Raw(b"q" * 20))
    mesh.client(dgram)
    unreach = bytes(IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / Raw(dgram))
    mesh.server(unreach)
    assert mesh.dropped == [] and mesh.delivered[INGRESS] == [unreach]
    assert len({h.code for _, _, h in mesh.hops}) == 1             # the error took its flow's code
    other = bytes(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=5001, dport=53) / Raw(b"q" * 20))
    mesh.server(bytes(IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / Raw(other)))
    assert [r for _, r in mesh.dropped] == ["icmp_unrelated"]


def test_neighbour_discovery_and_link_local_traffic_never_enter_the_chain():
    ns = bytes(IPv6(src=CLIENT6, dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fd00:1::1"))
    na = bytes(IPv6(src=CLIENT6, dst="fd00:2::99") / ICMPv6ND_NA(tgt=CLIENT6))  # even to a far address
    ll = bytes(IPv6(src="fe80::1", dst=SERVER6) / UDP(sport=1, dport=2))
    mesh = Mesh()
    for pkt in (ns, na, ll):
        mesh.client(pkt)
        mesh.server(pkt)
    assert [r for _, r in mesh.dropped] == ["link_local"] * 6
    assert mesh.hops == [] and mesh.flows() == 0


@pytest.mark.parametrize("pkt,own,local", [
    (IPv6(src=CLIENT6, dst="fd00:1::1") / UDP(), {"fd00:1::1"}, True),       # the edge's own
    (IPv6(src=CLIENT6, dst=SERVER6) / UDP(), {"fd00:1::1"}, False),
    (IPv6(src=CLIENT6, dst="ff02::2") / UDP(), set(), True),                   # multicast
    (IPv6(src=CLIENT6, dst="fe80::2") / UDP(), set(), True),                   # link-local destination
    (IPv6(src="::", dst=SERVER6) / UDP(), set(), True),                        # DAD's unspecified source
    (IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6ND_NA(), set(), True),             # ND whatever its address
    (IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest(), set(), False),
    (IP(src="10.1.0.10", dst="10.1.0.1") / UDP(), {"10.1.0.1"}, True),
    (IP(src="10.1.0.10", dst="224.0.0.1") / UDP(), set(), True),
    (IP(src="10.1.0.10", dst="10.2.0.10") / UDP(), {"10.1.0.1"}, False),
])
def test_link_local_judges_the_first_bytes(pkt, own, local):
    import ipaddress
    assert link_local(bytes(pkt), frozenset(ipaddress.ip_address(a).packed for a in own)) is local
    assert link_local(b"") is False and link_local(b"\x60" + bytes(10)) is False


def test_an_ipv6_packet_too_big_for_the_host_link_is_answered_with_packet_too_big():
    mesh = Mesh(host_mtu=1280)
    mesh.client(bytes(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=5000, dport=53) / Raw(b"s")))
    big = bytes(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=5000, dport=53) / Raw(b"b" * 1300))
    mesh.client(big)
    assert [r for _, r in mesh.dropped] == ["too_big"]
    assert len(mesh.delivered[EGRESS]) == 1                         # the small one only
    ptb = IPv6(mesh.delivered[INGRESS][0])
    assert (ptb.src, ptb.dst, ptb[ICMPv6PacketTooBig].mtu) == (SERVER6, CLIENT6, 1280)
    assert len(bytes(ptb)) == 1280 and bytes(ptb[ICMPv6PacketTooBig].payload) == big[:1280 - 48]
    want = ptb[ICMPv6PacketTooBig].cksum
    del ptb[ICMPv6PacketTooBig].cksum
    assert IPv6(bytes(ptb))[ICMPv6PacketTooBig].cksum == want      # a checksum the client accepts
    assert too_big(big, 1400)[40:48] == bytes([2, 0]) + too_big(big, 1400)[42:44] + (1400).to_bytes(4, "big")


def test_a_header_that_names_another_ip_version_than_its_packet_is_dropped():
    m = dual_map()
    b = ServiceNode("ba", m, Firewall())
    inner = c2s()
    code = test_edges.HASHER.code(1, parse(inner))
    for node, index in ((b, 1), (EgressNode(EGRESS, m), 0)):
        hdr = wire.pack(1, index, code, 1, m.epoch, next_proto=wire.NextProto.IPV4)
        assert [e.reason for e in node.from_fabric(hdr + inner, "aa", 0.0)] == ["next_proto_mismatch"]


def test_the_nat_refuses_ipv6_with_a_counted_reason():
    """NAT66 is out of scope: an IPv6 flow through a NAT is dropped, counted."""
    nat = create("nat", pool=["192.0.2.1"])
    assert nat.process(parse(c2s()), True, None, 0.0)[0].reason == "nat_unsupported"


def test_affinity_known_answer_for_an_ipv6_five_tuple_from_packets_of_both_directions():
    """The pinned vector of tests/test_kat.py, computed by the same function
    from parsed IPv6 packets of either direction."""
    hasher = AffinityHasher(KAT_SECRET)
    out = IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=443, dport=51000)
    back = IPv6(src="2001:db8::2", dst="2001:db8::1") / TCP(sport=51000, dport=443, flags="SA")
    assert hasher.code(1, parse(bytes(out))) == hasher.code(1, parse(bytes(back))) == 0x65A02C0C
    ping = IPv6(src=CLIENT6, dst=SERVER6) / ICMPv6EchoRequest(id=9)
    pong = IPv6(src=SERVER6, dst=CLIENT6) / ICMPv6EchoReply(id=9)
    assert hasher.code(1, parse(bytes(ping))) == hasher.code(1, parse(bytes(pong)))


def test_the_inspection_blocks_a_pattern_in_an_ipv6_stream():
    mesh = Mesh()
    mesh.client(c2s())
    mesh.server(s2c())
    mesh.client(c2s(flags="A", seq=1001, ack=5001))
    mesh.client(c2s(flags="PA", seq=1001, ack=5001, load=b"GET /SECR"))
    mesh.client(c2s(flags="PA", seq=1010, ack=5001, load=b"ET HTTP/1.1\r\n"))   # split over segments
    assert [r for _, r in mesh.dropped] == ["blocked"]
    assert len(mesh.delivered[EGRESS]) == 3


def test_an_ipv6_reply_too_big_for_the_client_link_is_answered_to_the_server():
    """The ingress side of Packet Too Big: a server's IPv6 reply too big for
    the client's host link is dropped at the ingress and answered, through
    the chain, to the server, which learns the client link's MTU."""
    mesh = Mesh()
    mesh.nodes[INGRESS].host_mtu = 1280
    mesh.client(bytes(IPv6(src=CLIENT6, dst=SERVER6) / UDP(sport=5000, dport=53) / Raw(b"q")))
    big = bytes(IPv6(src=SERVER6, dst=CLIENT6) / UDP(sport=53, dport=5000) / Raw(b"b" * 1300))
    mesh.server(big)
    assert [r for _, r in mesh.dropped] == ["too_big"] and mesh.delivered[INGRESS] == []
    ptb = IPv6(mesh.delivered[EGRESS][-1])
    assert (ptb.src, ptb.dst, ptb[ICMPv6PacketTooBig].mtu) == (CLIENT6, SERVER6, 1280)
