"""The NAT service: translation both ways, checksums, replies found by the
translated tuple, mappings that survive a failover with sync (and change
without: the control), port blocks that never collide."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.core.events import Deliver, Drop, Mirror, Send
from dataplane.core.node import EGRESS, INGRESS, EgressNode, IngressNode, ServiceNode
from dataplane.core.packet import parse
from dataplane.core.servicemap import Chain, InstanceState, ServiceMap, Tenant
from dataplane.core.services import Action, Verdict, create
from dataplane.core.services.nat import RST_TIMEOUT, Nat, adjust, endpoints_key
from tests.conftest import tcp, udp

HASHER = AffinityHasher(b"nat-tests")
POOL = ["198.51.100.7", "198.51.100.8"]
PUBLIC = {IP(dst=a).dst for a in POOL}


def nat_map(members: tuple[str, ...] = ("na", "nb")) -> ServiceMap:
    m = ServiceMap(buckets=1024)
    m.add_service(INGRESS, [INGRESS])
    m.add_service("F", ["fa"])
    m.add_service("N", list(members))
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "t1", ["10.1.0.0/16"]))
    m.add_chain(Chain(1, 1, ["F", "N"]))
    return m


class Mesh:
    """ingress -> F (firewall) -> N (nat: na, nb) -> egress, in memory."""

    def __init__(self, sync: bool = True, ports: tuple[int, int] = (20000, 20999)) -> None:
        self.map = nat_map()
        self.nodes = {INGRESS: IngressNode(INGRESS, self.map, HASHER), EGRESS: EgressNode(EGRESS, self.map),
                      "fa": ServiceNode("fa", self.map, create("firewall"), mirroring=sync)}
        for n in ("na", "nb"):
            self.nodes[n] = ServiceNode(n, self.map, create("nat", pool=POOL, ports=list(ports)),
                                        mirroring=sync)
        self.delivered: dict[str, list[bytes]] = {INGRESS: [], EGRESS: []}
        self.drops: list[tuple[str, str]] = []
        self.served: list[str] = []

    def run(self, src, events, now=0.0):
        for ev in events:
            if isinstance(ev, Send):
                if ev.to in ("na", "nb"):
                    self.served.append(ev.to)
                self.run(ev.to, self.nodes[ev.to].from_fabric(ev.data, src, now), now)
            elif isinstance(ev, Deliver):
                self.delivered[src].append(ev.data)
            elif isinstance(ev, Drop):
                self.drops.append((src, ev.reason))
            elif isinstance(ev, Mirror):
                self.nodes[ev.to].apply_update(ev.update, now)

    def client(self, data, now=0.0):
        self.run(INGRESS, self.nodes[INGRESS].from_client(data, now), now)

    def server(self, data, now=0.0):
        self.run(EGRESS, self.nodes[EGRESS].from_server(data, now), now)

    def kill(self, name, now=0.0):
        new = self.map.copy()
        new.set_state(name, InstanceState.DEAD)
        for n, node in self.nodes.items():
            if n != name:
                node.update_map(new, now)
        self.map = new


def checksums_ok(data: bytes) -> bool:
    """Scapy recomputes every checksum of a copy; they must equal the packet's."""
    p = IP(data)
    q = p.copy()
    del q[IP].chksum
    layer = TCP if TCP in q else UDP
    del q[layer].chksum
    q = IP(bytes(q))
    return p[IP].chksum == q[IP].chksum and p[layer].chksum == q[layer].chksum


def reply_to(out: bytes, flags: str = "SA", payload: bytes = b"") -> bytes:
    """The server's answer to a packet it received."""
    p = IP(out)
    syn_fin = 1 if p[TCP].flags & 0x03 else 0     # a SYN or FIN takes a sequence number
    return tcp(p.dst, p.src, p[TCP].dport, p[TCP].sport, flags=flags, seq=9000 if "S" in flags else 9001,
               ack=p[TCP].seq + syn_fin + len(p[TCP].payload), payload=payload)


def test_forward_source_translated_reply_translated_back_checksums_correct():
    mesh = Mesh()
    mesh.client(tcp(sport=40000, dport=80, flags="S", seq=100, payload=b"x" * 33))
    out = IP(mesh.delivered[EGRESS][0])
    assert out.src in PUBLIC and out.dst == "10.2.0.10" and out[TCP].dport == 80
    assert 20000 <= out[TCP].sport <= 20999 and out[TCP].sport != 40000
    assert checksums_ok(bytes(out))
    mesh.server(reply_to(bytes(out), payload=b"y" * 17))
    back = IP(mesh.delivered[INGRESS][0])
    assert (back.src, back.dst, back[TCP].sport, back[TCP].dport) == ("10.2.0.10", "10.1.0.10", 80, 40000)
    assert checksums_ok(bytes(back))
    assert mesh.drops == []


def test_udp_translated_and_a_zero_udp_checksum_stays_zero():
    mesh = Mesh()
    mesh.client(udp(sport=5353, dport=53))
    out = IP(mesh.delivered[EGRESS][0])
    assert out.src in PUBLIC and checksums_ok(bytes(out))
    raw = bytearray(udp(sport=5354, dport=53))
    raw[26:28] = b"\x00\x00"                      # no checksum
    mesh.client(bytes(raw))
    assert IP(mesh.delivered[EGRESS][1])[UDP].chksum == 0


def test_checksum_adjust_matches_a_full_recompute():
    """RFC 1624's incremental update against Scapy's full computation, for
    many rewrites (including ones that cross the 0xFFFF/0 boundary)."""
    for i in range(200):
        src, new = f"10.1.{i % 7}.{i % 250 + 1}", f"198.51.{i}.{255 - i % 200}"
        p = IP(bytes(IP(src=src, dst="10.2.0.10") / TCP(sport=1000 + i * 97, dport=80) / (b"z" * i)))
        q = p.copy()
        q.src, q[TCP].sport = new, 60000 - i
        del q[IP].chksum, q[TCP].chksum
        q = IP(bytes(q))
        o = bytes(map(int, src.split("."))) + (1000 + i * 97).to_bytes(2, "big")
        n = bytes(map(int, new.split("."))) + (60000 - i).to_bytes(2, "big")
        assert adjust(p[TCP].chksum, o, n) == q[TCP].chksum
        assert adjust(p[IP].chksum, o[:4], n[:4]) == q[IP].chksum


def test_a_promoted_secondary_keeps_the_mapping_and_serves_replies():
    mesh = Mesh(sync=True)
    mesh.client(tcp(sport=40001, flags="S", seq=100))
    first = IP(mesh.delivered[EGRESS][0])
    primary = mesh.served[-1]
    mesh.server(reply_to(bytes(first)))
    mesh.client(tcp(sport=40001, flags="A", seq=101, ack=9001))
    mesh.kill(primary)
    mesh.client(tcp(sport=40001, flags="PA", seq=101, ack=9001, payload=b"after"))
    after = IP(mesh.delivered[EGRESS][-1])
    assert mesh.served[-1] != primary
    assert (after.src, after[TCP].sport) == (first.src, first[TCP].sport)
    mesh.server(reply_to(bytes(after), flags="A"))
    back = IP(mesh.delivered[INGRESS][-1])
    assert back.dst == "10.1.0.10" and back[TCP].dport == 40001
    assert mesh.drops == []
    assert mesh.nodes[mesh.served[-1]].counters["took_over"] == 1


def test_control_without_sync_the_secondary_picks_another_port_and_replies_to_the_old_are_lost():
    mesh = Mesh(sync=False)
    mesh.client(tcp(sport=40001, flags="S", seq=100))
    first = IP(mesh.delivered[EGRESS][0])
    primary = mesh.served[-1]
    mesh.server(reply_to(bytes(first)))
    mesh.kill(primary)
    mesh.client(tcp(sport=40001, flags="PA", seq=101, ack=9001, payload=b"after"))
    after = IP(mesh.delivered[EGRESS][-1])
    assert mesh.served[-1] != primary
    assert after[TCP].sport != first[TCP].sport         # the server sees a new connection
    mesh.server(reply_to(bytes(first), flags="A"))       # an answer to the old mapping
    assert (EGRESS, "misdelivery") not in mesh.drops
    assert (mesh.served[-1], "misdelivery") in mesh.drops
    assert mesh.nodes[mesh.served[-1]].counters["flows_lost"] == 1


def test_instances_allocate_from_disjoint_blocks():
    na = ServiceNode("na", nat_map(), create("nat", pool=POOL, ports=[20000, 20999]))
    nb = ServiceNode("nb", nat_map(), create("nat", pool=POOL, ports=[20000, 20999]))
    assert na.service.block == (20000, 20499) and nb.service.block == (20500, 20999)
    seen = {}
    for node in (na, nb):
        for sport in range(41000, 41050):
            st = node.service.process(parse(tcp(sport=sport, flags="S")), True, None, 0.0)[1]
            seen.setdefault((st.public, st.public_port), []).append(node.name)
    assert all(len(v) == 1 for v in seen.values())
    assert {p for (_a, p), (n,) in seen.items() if n == "na"} <= set(range(20000, 20500))


def test_an_allocation_skips_tuples_of_replicas_held():
    """A replica inherited (or received back by bulk sync) in this
    instance's block blocks its tuple for new flows."""
    m = nat_map()
    node = ServiceNode("na", m, create("nat", pool=POOL[:1], ports=[20000, 20003]))
    owner = ServiceNode("nb", m, create("nat", pool=POOL[:1], ports=[20000, 20003]))
    # a flow whose mapping uses na's first port, led elsewhere and mirrored to na
    st = node.service.process(parse(tcp(sport=42000, flags="S")), True, None, 0.0)[1]
    assert st.public_port == 20000
    node.service._cursor = 0
    entry = owner.flows.insert((1, 7, 6, b"\x0a\x01\x00\x0a", 42000, b"\x0a\x02\x00\x0a", 80), 0.0, st)
    entry.version = 1
    assert node.apply_update(owner.update_of(entry), 0.0)
    got = node.service.process(parse(tcp(sport=42001, flags="S")), True, None, 0.0)[1]
    assert got.public_port == 20001
    entry = owner.flows.insert((1, 8, 6, b"\x0a\x01\x00\x0a", 42001, b"\x0a\x02\x00\x0a", 80), 0.0, got)
    entry.version = 1
    assert node.apply_update(owner.update_of(entry), 0.0)
    verdict, none = node.service.process(parse(tcp(sport=42002, flags="S")), True, None, 0.0)
    assert verdict.reason == "nat_exhausted" and none is None
    other_server = node.service.process(parse(tcp(sport=42003, dport=443, flags="S")), True, None, 0.0)[1]
    assert other_server.public_port == 20000          # ports are reused per server endpoint


def test_packets_the_nat_cannot_translate_are_dropped_with_a_reason():
    nat = Nat(pool=POOL)
    six = bytes(__import__("scapy.layers.inet6", fromlist=["IPv6"]).IPv6(src="2001:db8::1", dst="2001:db8::2")
                / TCP(sport=1, dport=2, flags="S"))
    icmp = bytes(IP(src="10.1.0.10", dst="10.2.0.10", proto=1) / (b"\x08\x00\x00\x00\x00\x01\x00\x01"))
    for data in (six, icmp):
        assert nat.process(parse(data), True, None, 0.0)[0].reason == "nat_unsupported"
    assert nat.process(parse(tcp(flags="R")), True, None, 0.0)[0].reason == "misdelivery"
    assert nat.process(parse(tcp(flags="SA")), False, None, 0.0)[0].reason == "misdelivery"


def test_state_round_trips_and_bad_state_is_a_value_error():
    nat = Nat(pool=POOL, ports=[1024, 2047])
    st = nat.process(parse(tcp(flags="S")), True, None, 0.0)[1]
    data = nat.encode_state(st)
    assert nat.decode_state(data) == st and nat.encode_state(nat.decode_state(data)) == data
    for bad in (data[:-1], data + b"\x00", b"\x02" + data[1:], data[:1] + b"\x01" + data[2:],
                data[:8] + b"\x01\x02\x03\x04" + data[12:], data[:12] + b"\x00\x01" + data[14:]):
        with pytest.raises(ValueError):
            nat.decode_state(bad)


def test_bad_options_are_refused():
    for opts in ({}, {"pool": ["not-an-ip"]}, {"pool": POOL + POOL[:1]},
                 {"pool": POOL, "ports": [5, 1]}, {"pool": POOL, "ports": [1, 70000]},
                 {"pool": POOL, "ports": "1-2"}):
        with pytest.raises(ValueError):
            Nat(**opts)
    with pytest.raises(ValueError):
        Nat(pool=POOL, ports=[1000, 1000]).attach(0, 2, lambda t: False)


def test_endpoints_key_orders_like_the_flow_key():
    from dataplane.core.node import flow_key

    inner = parse(tcp(src="198.51.100.7", dst="10.2.0.10", sport=20000, dport=80))
    key, _ = flow_key(1, 2, inner)
    assert key[2:] == endpoints_key(6, (inner.src, 20000), (inner.dst, 80))
    assert key[2:] == endpoints_key(6, (inner.dst, 80), (inner.src, 20000))


def test_header_options_travel_through_the_nat():
    mesh = Mesh()
    opt = wire.pack_gso(0, 0, 0, 0, 0, 0)
    events = mesh.nodes[INGRESS].from_client(tcp(sport=40100, flags="S"), 0.0, opt)
    send = events[0]
    out = mesh.nodes["fa"].from_fabric(send.data, INGRESS, 0.0)
    hop = [e for e in out if isinstance(e, Send)][0]
    res = mesh.nodes[hop.to].from_fabric(hop.data, "fa", 0.0)
    sent = [e for e in res if isinstance(e, Send)][0]
    h = wire.decode(sent.data)
    assert sent.data[20:h.length] == opt and IP(sent.data[h.length:]).src in PUBLIC


# --- verdicts, option and state checks, allocation order, checksum edges --------------

def test_verdicts_new_mappings_are_mirrored_with_the_protocols_timeout_rsts_shorten_it():
    nat = Nat(pool=POOL)
    v, st = nat.process(parse(tcp(sport=41000, flags="S")), True, None, 0.0)
    assert (v.action, v.mirror, v.timeout) == (Action.FORWARD, True, 600.0)
    v, ust = nat.process(parse(udp(sport=41000)), True, None, 0.0)
    assert (v.action, v.mirror, v.timeout) == (Action.FORWARD, True, 120.0)
    v, same = nat.process(parse(tcp(sport=41000, flags="A", seq=1001)), True, st, 0.0)
    assert v == Verdict(Action.FORWARD) and same is st
    v, _ = nat.process(parse(tcp(sport=41000, flags="R", seq=1001)), True, st, 0.0)
    assert v == Verdict(Action.FORWARD, timeout=RST_TIMEOUT)
    public = ".".join(str(b) for b in st.public)
    reply = tcp("10.2.0.10", public, 80, st.public_port, flags="A", seq=9001)
    v, _ = nat.process(parse(reply), False, st, 0.0)
    assert v == Verdict(Action.FORWARD)
    rst = tcp("10.2.0.10", public, 80, st.public_port, flags="R", seq=9001)
    v, _ = nat.process(parse(rst), False, st, 0.0)
    assert v == Verdict(Action.FORWARD, timeout=RST_TIMEOUT)


def test_a_reply_to_the_public_address_on_another_port_or_to_another_address_is_misdelivery():
    nat = Nat(pool=POOL)
    _, st = nat.process(parse(tcp(sport=41000, flags="S")), True, None, 0.0)
    public = ".".join(str(b) for b in st.public)
    other = next(a for a in POOL if a != public)
    for dst, dport in ((public, st.public_port + 1), (other, st.public_port)):
        v, back = nat.process(parse(tcp("10.2.0.10", dst, 80, dport, flags="SA")), False, st, 0.0)
        assert (v.action, v.reason) == (Action.DROP, "misdelivery") and back is st


def test_what_the_nat_refuses_is_dropped_with_its_reason():
    nat = Nat(pool=POOL[:1], ports=[20000, 20000])
    six = bytes(__import__("scapy.layers.inet6", fromlist=["IPv6"]).IPv6(src="2001:db8::1", dst="2001:db8::2")
                / TCP(sport=1, dport=2, flags="S"))
    assert nat.process(parse(six), True, None, 0.0)[0] == Verdict(Action.DROP, "nat_unsupported")
    assert nat.process(parse(tcp(flags="R")), True, None, 0.0)[0] == Verdict(Action.DROP, "misdelivery")
    assert nat.process(parse(tcp(flags="SA")), False, None, 0.0)[0] == Verdict(Action.DROP, "misdelivery")
    nat.attach(0, 1, lambda t: True)                      # every tuple taken
    assert nat.process(parse(tcp(sport=2, flags="S")), True, None, 0.0)[0] == Verdict(Action.DROP, "nat_exhausted")


def test_a_lone_nat_hands_out_its_whole_range_in_turn():
    """Not attached to a service (one member), an instance owns the whole
    range; each allocation starts after the last one, across the pool."""
    nat = Nat(pool=POOL, ports=[20000, 20002])
    assert nat.block == (20000, 20002)
    got = [nat.process(parse(tcp(sport=41000 + i, flags="S")), True, None, 0.0)[1] for i in range(7)]
    pairs = [(".".join(map(str, m.public)), m.public_port) for m in got[:6]]
    assert pairs == [(POOL[0], 20000), (POOL[0], 20001), (POOL[0], 20002),
                     (POOL[1], 20000), (POOL[1], 20001), (POOL[1], 20002)]
    assert (got[6].public, got[6].public_port) == (got[0].public, 20000)   # round again


def test_an_allocation_after_a_tuple_in_use_takes_the_next_one_up():
    used = endpoints_key(6, (bytes(map(int, POOL[0].split("."))), 20000), (bytes([10, 2, 0, 10]), 80))
    nat = Nat(pool=POOL[:1], ports=[20000, 20003])
    nat.attach(0, 1, lambda t: t == used)
    assert nat.process(parse(tcp(sport=41000, flags="S")), True, None, 0.0)[1].public_port == 20001


def test_a_port_range_splits_down_to_one_port_per_instance():
    nat = Nat(pool=POOL, ports=[5000, 5001])
    nat.attach(1, 2, lambda t: False)
    assert nat.block == (5001, 5001)
    with pytest.raises(ValueError, match="^nat ports 5000-5001 cannot be split over 3 instances$"):
        nat.attach(0, 3, lambda t: False)


@pytest.mark.parametrize("ports", [[1, 65535], [5000, 5000]])
def test_port_ranges_from_1_to_65535_and_of_one_port_are_accepted(ports):
    assert Nat(pool=POOL, ports=ports).ports == tuple(ports)


PORTS_MESSAGE = "nat ports must be [first, last] within 1-65535, got {!r}"


@pytest.mark.parametrize("opts,message", [
    ({}, "nat needs a pool of at least one public IPv4 address"),
    ({"pool": ["not-an-ip"]}, "nat pool: Expected 4 octets in 'not-an-ip'"),
    ({"pool": POOL + POOL[:1]}, "nat pool lists an address twice"),
    ({"pool": POOL, "ports": [5, 1]}, PORTS_MESSAGE.format([5, 1])),
    ({"pool": POOL, "ports": [0, 1]}, PORTS_MESSAGE.format([0, 1])),
    ({"pool": POOL, "ports": [1, 65536]}, PORTS_MESSAGE.format([1, 65536])),
    ({"pool": POOL, "ports": [1, 2, 3]}, PORTS_MESSAGE.format([1, 2, 3])),
    ({"pool": POOL, "ports": ["1024", "2048"]}, PORTS_MESSAGE.format(["1024", "2048"])),
    ({"pool": POOL, "ports": [True, 5]}, PORTS_MESSAGE.format([True, 5])),
])
def test_bad_options_are_refused_saying_why(opts, message):
    with pytest.raises(ValueError) as err:
        Nat(**opts)
    assert str(err.value) == message


def test_a_mapping_on_the_last_port_of_the_range_round_trips_and_bad_states_say_why():
    nat = Nat(pool=POOL[:1], ports=[20000, 20000])
    st = nat.process(parse(tcp(flags="S")), True, None, 0.0)[1]
    data = nat.encode_state(st)
    assert st.public_port == 20000 and nat.decode_state(data) == st
    for bad, message in ((data[:-1], "nat state is 20 bytes, got 19"),
                         (b"\x02" + data[1:], "nat state version 2, expected 1"),
                         (data[:1] + b"\x01" + data[2:], "nat state of protocol 1"),
                         (data[:12] + b"\x4e\x21" + data[14:], "nat state maps outside this service's pool")):
        with pytest.raises(ValueError) as err:
            nat.decode_state(bad)
        assert str(err.value) == message


def test_an_empty_udp_datagram_gets_its_checksum_fixed():
    nat = Nat(pool=POOL)
    data = udp(sport=5353, payload=b"")
    st = nat.process(parse(data), True, None, 0.0)[1]
    assert checksums_ok(nat.rewrite(st, True, data))


def test_a_udp_checksum_that_comes_out_zero_is_sent_as_all_ones():
    """0 means "no checksum" in UDP: a computed 0 goes on the wire as 0xFFFF."""
    nat = Nat(pool=POOL)
    probe = udp(sport=5353, payload=b"\x00\x00")
    st = nat.process(parse(probe), True, None, 0.0)[1]
    word = IP(nat.rewrite(st, True, probe))[UDP].chksum      # the payload word that sums to zero
    data = udp(sport=5353, payload=word.to_bytes(2, "big"))
    assert IP(data)[UDP].chksum != 0
    out = nat.rewrite(st, True, data)
    assert IP(out)[UDP].chksum == 0xFFFF and checksums_ok(out)


def test_a_packet_cut_inside_its_transport_header_is_rewritten_without_its_checksum():
    nat = Nat(pool=POOL)
    data = tcp(sport=41000, flags="S")
    st = nat.process(parse(data), True, None, 0.0)[1]
    cut = nat.rewrite(st, True, data[:20 + 17])
    assert len(cut) == 37 and IP(cut).src in PUBLIC and cut[20 + 16:] == data[20 + 16:37]
