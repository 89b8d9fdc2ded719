"""Dual stack on the namespace lab (issue #15 item 3): IPv6 through the
chain with real kernels on both hosts, neighbour discovery answered on each
link and never carried, `amesh send` of crafted IPv6 (the failover of
IPv6 flows is in tests/test_ipv6_failover.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from click.testing import CliRunner
from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6EchoReply, IPv6

from dataplane.cli.main import main
from tests.test_failover import B

PAGE = os.urandom(300_000)


def test_curl6_through_the_chain_and_ipv4_beside_it(lab, tmp_path):
    sha = lab.http_server({"page": PAGE}, port=8086, family=6)["page"]
    before = lab.ask("ingress", "status")
    for family in (6, 4):
        if family == 4:
            lab.http_server({"page": PAGE}, port=8084)
        out = tmp_path / f"page{family}"
        res = lab.run("client", ["curl", f"-{family}", "-sS", "-m", "20", "-o", str(out),
                                 lab.url("page", 8086 if family == 6 else 8084, family)])
        assert res.returncode == 0, res.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
    after = lab.ask("ingress", "status")
    assert after["counters"]["encapsulated"] > before["counters"].get("encapsulated", 0)
    # the edges' kernels answered neighbour discovery on each link; the chain never saw it
    neigh = lab.run("client", ["ip", "-6", "neigh", "show", "fd00:1::1"]).stdout
    assert lab.topo.mac_of("ingress") in neigh
    assert all(lab.ask(n, "status")["drops"].get("link_local", 0) == 0 for n in ("ingress", "egress"))
    for i in ("aa", "ab", *B):
        drops = lab.ask(i, "status")["drops"]
        assert not drops.get("next_proto_mismatch") and not drops.get("misdelivery"), (i, drops)
    status = CliRunner().invoke(main, ["lab", "status", "--lab", lab.name, "--json"])
    rows = {r["node"]: r for r in json.loads(status.output)["nodes"]}
    assert (rows["client"]["address6"], rows["server"]["address6"]) == ("fd00:1::10/64", "fd00:2::10/64")


def test_ping6_through_the_chain(lab):
    out = lab.tool("client", "ping", lab.topo.host_ip("server", 6), "-c", "3")[0]
    assert out["received"] == 3, out


def test_amesh_send_crafted_ipv6_from_the_client_reaches_the_server(lab, capture):
    cap = capture("server", "eth0", "ip6 and udp port 9696")
    res = CliRunner().invoke(main, ["send", "--lab", lab.name, "client", "--src", "fd00:1::10",
                                    "--dst", "fd00:2::10", "--proto", "udp", "--sport", "45000",
                                    "--dport", "9696", "--payload", "crafted six", "--encap", "none",
                                    "--count", "3"])
    assert res.exit_code == 0, res.output
    got = cap.stop()
    assert len(got) == 3
    assert all(p[IPv6].src == "fd00:1::10" and p[UDP].sport == 45000 and bytes(p[UDP].payload) == b"crafted six"
               for p in got)
    replies = capture("client", "eth0", "icmp6 and ip6[40] == 129")     # echo replies from the server's kernel
    res = CliRunner().invoke(main, ["send", "--lab", lab.name, "client", "--src", "fd00:1::10",
                                    "--dst", "fd00:2::10", "--proto", "icmp", "--sport", "4646",
                                    "--encap", "none", "--count", "2"])
    assert res.exit_code == 0, res.output
    time.sleep(0.3)
    got = replies.stop()
    assert [(p[IPv6].src, p[ICMPv6EchoReply].id) for p in got] == [("fd00:2::10", 4646)] * 2
