"""Write the golden input/expected pcap pairs of tests/test_golden.py.

    python -m tests.golden.generate        (or: make golden)

Inputs are crafted here with Scapy; expected outputs are derived here from
the inputs and the default lab's topology (addresses, MACs, secret, map),
never recorded from the system under test, so a golden test can fail.
Cases:

Every TCP case is a two-sided session (the client's and the server's
packets in one input pcap, sent each from its host by
`dataplane.lab.packets.send_session` while the hosts' kernels are kept
deaf to port 7): the firewall tracks both directions' windows, as conntrack
does, so a one-sided session would be out of window.

* tcp_session: handshake, data, the server's ACK and both FINs; expected at
  the server the client's half (MACs of the egress -> server link), at the
  client the server's half (MACs of the ingress -> client link), and on the
  ingress -> A hop the client's half (outer IP/UDP to the A primary,
  affinity header chain 1, index 2, the code);
* return: a handshake, then data from the server; expected at the client:
  the server's half;
* blocked: a flow whose client sends the inspection rule's pattern after
  the handshake; expected at the server: the client's packets before it;
* malformed: five bad affinity headers sent into a B instance; expected:
  nothing forwarded, each counted by reason;
* steering: a client sending an affinity header to the fabric port; expected:
  nothing at the server, `steering_attempt` counted at the ingress;
* udp6: IPv6 datagrams from the client; expected at the server unchanged
  and on the ingress -> A hop with the header's next protocol IPv6;
* ping6: ICMPv6 echo requests from the client, which the server's kernel
  answers: a two-sided exchange (no TCP window to track); expected: the
  requests at the server and the replies at the client (built here from the
  requests: addresses swapped, type 129, the same id, sequence and data,
  the kernel's hop limit 64; its flow label is masked).
"""

from __future__ import annotations

from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.lab.topology import Host, Topology, load
from layers.affinity import Affinity

HERE = Path(__file__).resolve().parent
DEFAULT = HERE.parents[1] / "labs" / "default.toml"
MALFORMED = {  # reason -> header fields
    "bad_version": {"version": 7}, "bad_length": {"length": 200}, "ttl_expired": {"ttl": 0},
    "unknown_chain": {"chain": 99}, "bad_index": {"index": 9},
}


def _client_tcp(topo: Topology, sport: int, flags: str, seq: int, ack: int = 0,
                load: bytes = b"", dport: int = 7) -> Packet:
    c, s = topo.hosts["client"], topo.hosts["server"]
    return (Ether(src=topo.mac_of("client"), dst=topo.mac_of(topo.ingress.name))
            / IP(src=str(c.address.ip), dst=str(s.address.ip), id=seq & 0xFFFF)
            / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240) / Raw(load))


def _server_tcp(topo: Topology, dport: int, flags: str, seq: int, ack: int, load: bytes = b"") -> Packet:
    c, s = topo.hosts["client"], topo.hosts["server"]
    return (Ether(src=topo.mac_of("server"), dst=topo.mac_of(topo.egress.name))
            / IP(src=str(s.address.ip), dst=str(c.address.ip), id=seq & 0xFFFF)
            / TCP(sport=7, dport=dport, flags=flags, seq=seq, ack=ack, window=64240) / Raw(load))


def _at(pkts: list[Packet], src_mac: str, dst_mac: str) -> list[Packet]:
    """The same packets as seen on another link (only the MACs change)."""
    out = []
    for p in pkts:
        q = Ether(bytes(p))
        q.src, q.dst = src_mac, dst_mac
        out.append(q)
    return out


def _half(pkts: list[Packet], host: Host) -> list[Packet]:
    """The packets one lab host sends in a two-sided session."""
    return [p for p in pkts if p[IP].src == str(host.address.ip)]


def _fabric(topo: Topology, pkts: list[Packet]) -> list[Packet]:
    """Ingress -> A hop: outer IP/UDP to the A primary, header chain 1 index 2."""
    m = topo.build_map()
    out = []
    for p in pkts:
        inner = p[IP]
        code = AffinityHasher(topo.secret).code_of(1, inner.src, inner[TCP].sport, inner.dst,
                                                   inner[TCP].dport, 6)
        a = m.primary("A", code)
        out.append(Ether() / IP(src=topo.fabric_ip(topo.ingress.name), dst=topo.fabric_ip(a))
                   / UDP(dport=wire.UDP_PORT) / Affinity(chain=1, index=2, code=code, client=1,
                                                         epoch=m.epoch) / IP(bytes(inner)))
    return out


def _client6(topo: Topology, l4: Packet) -> Packet:
    c, s = topo.hosts["client"], topo.hosts["server"]
    assert c.address6 is not None and s.address6 is not None
    return (Ether(src=topo.mac_of("client"), dst=topo.mac_of(topo.ingress.name))
            / IPv6(src=str(c.address6.ip), dst=str(s.address6.ip)) / l4)


def _echo_reply(req: Packet, src_mac: str, dst_mac: str) -> Packet:
    """What the server's kernel answers to an echo request, as the client sees it."""
    ip, echo = req[IPv6], req[ICMPv6EchoRequest]
    return (Ether(src=src_mac, dst=dst_mac) / IPv6(src=ip.dst, dst=ip.src, hlim=64)
            / ICMPv6EchoReply(id=echo.id, seq=echo.seq, data=echo.data))


def _fabric6(topo: Topology, pkts: list[Packet]) -> list[Packet]:
    """Ingress -> A hop of IPv6 UDP datagrams: next protocol IPv6."""
    m = topo.build_map()
    out = []
    for p in pkts:
        inner = p[IPv6]
        code = AffinityHasher(topo.secret).code_of(1, inner.src, inner[UDP].sport, inner.dst,
                                                   inner[UDP].dport, 17)
        out.append(Ether() / IP(src=topo.fabric_ip(topo.ingress.name), dst=topo.fabric_ip(m.primary("A", code)))
                   / UDP(dport=wire.UDP_PORT) / Affinity(chain=1, index=2, code=code, client=1, epoch=m.epoch,
                                                         next_proto=wire.NextProto.IPV6)
                   / IPv6(bytes(inner)))
    return out


def cases(topo: Topology) -> dict[str, dict[str, list[Packet]]]:
    srv_link = (topo.mac_of(topo.egress.name), topo.mac_of("server"))
    cli_link = (topo.mac_of(topo.ingress.name), topo.mac_of("client"))
    session = [_client_tcp(topo, 43000, "S", 1000), _server_tcp(topo, 43000, "SA", 5000, 1001),
               _client_tcp(topo, 43000, "A", 1001, 5001),
               _client_tcp(topo, 43000, "PA", 1001, 5001, b"hello golden"),
               _server_tcp(topo, 43000, "A", 5001, 1013), _client_tcp(topo, 43000, "FA", 1013, 5001),
               _server_tcp(topo, 43000, "FA", 5001, 1014), _client_tcp(topo, 43000, "A", 1014, 5002)]
    ret = [_client_tcp(topo, 43100, "S", 1000), _server_tcp(topo, 43100, "SA", 5000, 1001),
           _client_tcp(topo, 43100, "A", 1001, 5001),
           _server_tcp(topo, 43100, "PA", 5001, 1001, b"reply from the server"),
           _client_tcp(topo, 43100, "A", 1001, 5022)]
    blocked = [_client_tcp(topo, 43200, "S", 2000), _server_tcp(topo, 43200, "SA", 7000, 2001),
               _client_tcp(topo, 43200, "A", 2001, 7001),
               _client_tcp(topo, 43200, "PA", 2001, 7001, b"leak SECRET-TOKEN now"),
               _client_tcp(topo, 43200, "PA", 2022, 7001, b"and more")]
    c, s = topo.hosts["client"], topo.hosts["server"]
    malformed = [Ether() / IP(src="10.99.0.250", dst="10.99.0.12") / UDP(sport=wire.UDP_PORT)
                 / Affinity(**{"chain": 1, "index": 1, "code": 5, "client": 1, "epoch": 1, **fields})
                 / IP(src=str(c.address.ip), dst=str(s.address.ip)) / TCP(sport=43300 + i, dport=7)
                 for i, fields in enumerate(MALFORMED.values())]
    steering = [Ether(src=topo.mac_of("client"), dst=topo.mac_of(topo.ingress.name))
                / IP(src=str(c.address.ip), dst=str(s.address.ip)) / UDP(sport=43400, dport=wire.UDP_PORT)
                / Affinity(chain=1, index=1, code=0xBAD, client=1, epoch=1) / IP() / TCP()]
    udp6 = [_client6(topo, UDP(sport=43600, dport=9697) / Raw(f"datagram {i} over IPv6".encode()))
            for i in range(3)]
    ping6 = [_client6(topo, ICMPv6EchoRequest(id=0x6006, seq=i, data=b"golden ping6 %d" % i)) for i in range(3)]
    return {
        "udp6": {"in": udp6, "server": _at(udp6, *srv_link), "fabric": _fabric6(topo, udp6)},
        "ping6": {"in": ping6, "server": _at(ping6, *srv_link),
                  "client": [_echo_reply(p, *cli_link) for p in ping6]},
        "tcp_session": {"in": session, "server": _at(_half(session, c), *srv_link),
                        "client": _at(_half(session, s), *cli_link), "fabric": _fabric(topo, _half(session, c))},
        "return": {"in": ret, "client": _at(_half(ret, s), *cli_link)},
        "blocked": {"in": blocked, "server": _at(_half(blocked, c)[:2], *srv_link)},
        "malformed": {"in": malformed},
        "steering": {"in": steering},
    }


def main() -> None:
    topo = load(DEFAULT)
    for name, files in cases(topo).items():
        for kind, pkts in files.items():
            wrpcap(str(HERE / f"{name}.{kind}.pcap"), pkts)
            print(f"wrote tests/golden/{name}.{kind}.pcap ({len(pkts)} packets)")


if __name__ == "__main__":
    main()
