"""What a user's own repository would write: packets through a chain,
checked on the far side, with the affinity-mesh plugin's fixtures only."""

from scapy.layers.inet import IP, TCP

SERVER = "server"


def syn(dport: int, sport: int) -> IP:
    return IP(src="10.1.0.10", dst="10.2.0.10") / TCP(sport=sport, dport=dport, flags="S", seq=1)


def test_a_syn_crosses_the_chain_unchanged(amesh_lab, amesh_capture, amesh_send, amesh_assert_packets):
    seen = amesh_capture(SERVER, "eth0", "tcp and src host 10.1.0.10")
    sent = [syn(8080, 41000), syn(8080, 41001)]
    amesh_send("client", sent)
    got = [p[IP] for p in seen.stop()]
    # two flows, each through its own firewall instance: they may arrive in
    # either order, so both sides are compared in source-port order
    by_port = lambda p: p[TCP].sport          # noqa: E731
    amesh_assert_packets(sorted(sent, key=by_port), sorted(got, key=by_port))   # all but checksums, MACs


def test_the_firewall_refuses_port_23_and_counts_it(amesh_lab, amesh_capture, amesh_send):
    seen = amesh_capture(SERVER, "eth0", "tcp port 23")
    before = sum(amesh_lab.ask(i, "status")["drops"].get("policy_denied", 0) for i in ("fw1", "fw2"))
    amesh_send("client", [syn(23, 41100)])
    assert seen.stop() == []
    after = sum(amesh_lab.ask(i, "status")["drops"].get("policy_denied", 0) for i in ("fw1", "fw2"))
    assert after == before + 1
