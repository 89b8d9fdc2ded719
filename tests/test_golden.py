"""Golden pcaps through the lab: send this, expect that on these links.

Inputs and expected outputs live in tests/golden/ (made by
`python -m tests.golden.generate`, i.e. `make golden`). A new case takes a
few lines: the `lab` and `capture` fixtures, `send_into`-style injection with
`dataplane.lab.packets.send`, and `assert_packets` with masks.
"""

from __future__ import annotations

import time
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.utils import rdpcap

from dataplane.lab import faults
from dataplane.lab.packets import deaf, send, send_session
from layers.affinity import Affinity
from dataplane.testing import FABRIC, assert_packets
from tests.golden.generate import MALFORMED

GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> list:
    return list(rdpcap(str(GOLDEN / f"{name}.pcap")))


def from_client(pkts: list) -> list:
    return [p for p in pkts if IP in p and p[IP].src == "10.1.0.10"]


def session(lab, name: str) -> None:
    """Send a two-sided golden session, the hosts' kernels deaf to port 7."""
    with deaf(lab.topo, ["client", "server"], 7):
        send_session(lab.topo, golden(name))


def test_tcp_session_through_the_chain(lab, capture):
    m = lab.map()
    code = lab.topo.stream_code(43000, 7)
    a = m.primary("A", code)
    server = capture("server", "eth0", "tcp port 43000 and src host 10.1.0.10")
    client = capture("client", "eth0", "tcp port 43000 and src host 10.2.0.10")
    hop = capture(a, "fab0", f"udp port 6886 and dst host {lab.topo.fabric_ip(a)}")
    session(lab, "tcp_session.in")
    assert_packets(golden("tcp_session.server"), server.stop())
    assert_packets(golden("tcp_session.client"), client.stop())
    fabric = [p for p in hop.stop() if Affinity in p and p[Affinity][TCP].sport == 43000]
    assert_packets(golden("tcp_session.fabric"), fabric, FABRIC)


def test_return_direction(lab, capture):
    client = capture("client", "eth0", "tcp port 43100 and src host 10.2.0.10")
    session(lab, "return.in")
    assert_packets(golden("return.client"), client.stop())


def test_blocked_flow_stops_at_the_pattern(lab, capture):
    server = capture("server", "eth0", "src host 10.1.0.10 and tcp port 43200")
    before = sum(lab.ask(i, "status")["drops"].get("blocked", 0) for i in ("aa", "ab"))
    session(lab, "blocked.in")
    assert_packets(golden("blocked.server"), server.stop())
    after = sum(lab.ask(i, "status")["drops"].get("blocked", 0) for i in ("aa", "ab"))
    assert after - before == 2          # the matching packet and the one after it


def test_a_deaf_host_sends_no_rst_and_hears_again_after(lab, capture):
    """The control for `deaf`: the same SYN to closed port 7 is answered by
    the server's kernel with a RST outside `deaf`, and not inside."""
    from tests.golden.generate import _client_tcp

    rsts = "tcp[tcpflags] & tcp-rst != 0 and src host 10.2.0.10"
    inside = capture("server", "eth0", rsts)
    with deaf(lab.topo, ["client", "server"], 7):
        send(lab.topo, "client", [_client_tcp(lab.topo, 43600, "S", 1)])
        time.sleep(0.3)
    assert inside.stop() == []
    outside = capture("server", "eth0", rsts)
    send(lab.topo, "client", [_client_tcp(lab.topo, 43601, "S", 1)])
    time.sleep(0.3)
    assert len(outside.stop()) == 1


def test_ipv6_datagrams_through_the_chain(lab, capture):
    m = lab.map()
    code = lab.topo.stream_code(43600, 9697, proto=17, family=6)
    a = m.primary("A", code)
    server = capture("server", "eth0", "ip6 and udp port 9697")
    hop = capture(a, "fab0", f"udp port 6886 and dst host {lab.topo.fabric_ip(a)}")
    send(lab.topo, "client", golden("udp6.in"))
    assert_packets(golden("udp6.server"), server.stop())
    fabric = [p for p in hop.stop() if Affinity in p and UDP in p[Affinity] and p[Affinity][UDP].sport == 43600]
    assert_packets(golden("udp6.fabric"), fabric, FABRIC)


def test_icmpv6_echo_both_ways(lab, capture):
    """Two-sided: the server's kernel answers the crafted requests, so the
    firewall sees a real exchange (no TCP window for one-sided traffic to miss)."""
    server = capture("server", "eth0", "icmp6 and ip6[40] == 128")
    client = capture("client", "eth0", "icmp6 and ip6[40] == 129")
    send(lab.topo, "client", golden("ping6.in"))
    time.sleep(0.3)
    assert_packets(golden("ping6.server"), server.stop())
    assert_packets(golden("ping6.client"), client.stop(), {"IPv6": {"fl"}})


def test_malformed_headers_are_dropped_and_counted_by_reason(lab, capture):
    server = capture("server", "eth0", "src host 10.1.0.10 and tcp portrange 43300-43304")
    before = lab.ask("ba", "status")["drops"]
    send(lab.topo, "ba", golden("malformed.in"))
    time.sleep(0.2)
    after = lab.ask("ba", "status")["drops"]
    for reason in MALFORMED:
        assert after.get(reason, 0) - before.get(reason, 0) == 1, reason
    assert server.stop() == []
    assert lab.ask("ba", "status")["ready"]        # nothing crashed


def test_affinity_header_from_the_client_side_is_refused(lab, capture):
    server = capture("server", "eth0", "udp port 6886")
    before = lab.ask("ingress", "status")["drops"].get("steering_attempt", 0)
    send(lab.topo, "client", golden("steering.in"))
    time.sleep(0.2)
    assert lab.ask("ingress", "status")["drops"].get("steering_attempt", 0) == before + 1
    assert server.stop() == []


def test_packets_after_a_failover_carry_rerouted_and_the_new_epoch(lab, capture):
    """Golden by construction: the first packet a hop sends to the promoted
    secondary carries REROUTED and the new epoch; the next does not."""
    from tests.golden.generate import _client_tcp

    topo = lab.topo
    code = topo.stream_code(43500, 7)
    m = lab.map()
    primary, secondary = m.primary("B", code), m.secondary("B", code)
    send(topo, "client", [_client_tcp(topo, 43500, "S", 3000)])
    time.sleep(0.3)
    hop = capture(secondary, "fab0", f"udp port 6886 and dst host {topo.fabric_ip(secondary)}")
    epoch = m.epoch
    faults.kill(lab.state, primary)
    new_epoch = lab.wait_epoch(epoch)
    time.sleep(0.2)
    send(topo, "client", [_client_tcp(topo, 43500, "A", 3001, 9001),
                          _client_tcp(topo, 43500, "PA", 3001, 9001, b"after the failover")])
    got = [p[Affinity] for p in hop.stop() if Affinity in p and p[Affinity][TCP].sport == 43500]
    assert len(got) == 2
    assert got[0].flags.rerouted and got[0].epoch == new_epoch > epoch
    assert not got[1].flags.rerouted and got[1].code == code and got[1].index == 1
    faults.restart(topo, lab.state, primary)       # leave the module's lab whole


def test_garbage_on_every_port_is_counted_and_harmless(lab):
    """Random datagrams to an instance's fabric, sync and control ports."""
    import os as _os

    from scapy.layers.l2 import Ether

    from dataplane.core import syncwire as sw

    rnd = [_os.urandom(n) for n in (1, 7, 19, 20, 40, 64, 200, 1400) for _ in range(5)]
    pkts = [Ether() / IP(src="10.99.0.250", dst="10.99.0.12") / UDP(sport=1, dport=port) / data
            for port in (6886, sw.SYNC_PORT, sw.CONTROL_PORT) for data in rnd]
    before = lab.ask("ba", "status")
    send(lab.topo, "ba", pkts)
    time.sleep(0.3)
    after = lab.ask("ba", "status")
    assert after["ready"] and after["pid"] == before["pid"]
    dropped = sum(after["drops"].values()) - sum(before["drops"].values())
    assert dropped >= len(rnd) - 1          # every fabric datagram dropped with a reason
    rejected = sum(sum(p["rejected"].values()) for p in after["sync"]["peers"].values())
    assert rejected + after["sync"]["counters"].get("unknown_sender", 0) > 0


def test_a_client_reaches_its_edges_own_sockets_only_to_be_refused(lab):
    """The ingress namespace accepts packets for its fabric address on any
    link (Linux's weak host model), so a client can address the ingress's
    fabric and control sockets: the fabric socket drops them (not a node),
    the control socket refuses them (no key), and the ingress's classifier
    drops the UDP to the fabric port (a steering attempt)."""
    from dataplane.core import syncwire as sw

    ingress = lab.topo.fabric_ip("ingress")
    before = lab.ask("ingress", "status")
    pkts = [IP(src="10.1.0.10", dst=ingress) / UDP(sport=40000, dport=port) / (b"\x10" + bytes(99))
            for port in (6886, sw.CONTROL_PORT)]
    send(lab.topo, "client", pkts)
    time.sleep(0.3)
    after = lab.ask("ingress", "status")
    assert after["pid"] == before["pid"] and not after["internal_error"]
    grew = {k: v - before["drops"].get(k, 0) for k, v in after["drops"].items() if v != before["drops"].get(k, 0)}
    rejected = sum(after["control_rejected"].values()) - sum(before["control_rejected"].values())
    print(f"\ningress drops grew by {grew}, control refusals by {rejected}")
    assert grew.get("steering_attempt") == 1
    assert grew.get("not_a_node") == 1 and rejected == 1
