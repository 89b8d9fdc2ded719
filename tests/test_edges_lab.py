"""Fragments and ICMP errors with real hosts (issue #14 findings 3 and 11),
in labs/edges.toml: chain 1 = [F] (firewall, port 23 denied), chain 2 =
[P, F] for port 9000.

* A UDP datagram to port 9000 sent by the client as Scapy fragments in
  reverse order reaches a real UDP socket on the server whole, through P
  (chain 2); control: a SYN with MF to the denied port 23 is dropped and
  counted like an unfragmented one, and nothing reaches the server.
* A real port unreachable: the client's connected UDP socket to a closed
  server port gets ECONNREFUSED from the server kernel's ICMP error;
  control: the same error quoting an unrelated flow is dropped and counted.
* A frag-needed emitted in the server's namespace about a live TCP
  connection reaches the client; control: about a flow that does not exist,
  it does not.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.packet import Raw

from dataplane.lab.packets import send

LAB = Path(__file__).resolve().parents[1] / "labs" / "edges.toml"
CLIENT, SERVER = "10.1.0.10", "10.2.0.10"
PAYLOAD = bytes(range(256)) * 16  # 4 KB: three fragments on the way in, three on the way out


@pytest.fixture(scope="module")
def amesh_topology() -> Path:
    return LAB


def total(lab, nodes: tuple[str, ...], kind: str, name: str) -> int:
    return sum(lab.ask(n, "status")[kind].get(name, 0) for n in nodes)


def py(lab, node: str, code: str, timeout: float = 20):
    return lab.run(node, [sys.executable, "-c", code], timeout=timeout)


UDP_SINK = f"""
import hashlib, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{SERVER}", 9000))
s.settimeout(8)
print("ready", flush=True)
data, addr = s.recvfrom(65535)
print(len(data), hashlib.sha256(data).hexdigest(), addr[0], flush=True)
"""


def test_reverse_fragments_reach_a_real_socket_whole_through_the_port_chain(lab, capture):
    sink = lab.spawn("server", [sys.executable, "-c", UDP_SINK], stdout=-1, text=True)
    assert sink.stdout.readline().strip() == "ready"
    p_before = total(lab, ("pa", "pb"), "counters", "forwarded")
    dgram = IP(src=CLIENT, dst=SERVER, id=4242) / UDP(sport=5000, dport=9000) / Raw(PAYLOAD)
    pieces = fragment(dgram, fragsize=1400)
    assert len(pieces) == 3
    send(lab.topo, "client", pieces[::-1])
    out, _ = sink.communicate(timeout=15)
    assert out.split() == [str(len(PAYLOAD)), hashlib.sha256(PAYLOAD).hexdigest(), CLIENT]
    assert total(lab, ("pa", "pb"), "counters", "forwarded") - p_before == 1  # chain 2 took it
    assert lab.ask("ingress", "status")["counters"].get("reassembled", 0) >= 1


def test_control_syn_with_mf_to_a_denied_port_is_dropped_and_counted(lab, capture):
    server = capture("server", "eth0", f"src host {CLIENT}")
    before = total(lab, ("fa", "fb"), "drops", "policy_denied")
    syn = IP(src=CLIENT, dst=SERVER, id=4343) / TCP(sport=40023, dport=23, flags="S") / Raw(b"x" * 1200)
    send(lab.topo, "client", fragment(syn, fragsize=600))
    time.sleep(0.3)
    assert total(lab, ("fa", "fb"), "drops", "policy_denied") - before == 1
    assert server.stop() == []


REFUSED = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{CLIENT}", 5999))
s.connect(("{SERVER}", 9999))
s.settimeout(5)
s.send(b"anyone there?")
try:
    s.recv(100)
    print("answered")
except ConnectionRefusedError:
    print("ECONNREFUSED")
except TimeoutError:
    print("timeout")
"""


def test_port_unreachable_reaches_the_clients_socket(lab, capture):
    before = total(lab, ("fa", "fb"), "counters", "icmp_related")
    res = py(lab, "client", REFUSED)
    assert res.stdout.strip() == "ECONNREFUSED", res.stderr
    assert total(lab, ("fa", "fb"), "counters", "icmp_related") - before == 1


def test_control_port_unreachable_about_an_unrelated_flow_is_dropped(lab, capture):
    client = capture("client", "eth0", "icmp")
    before = lab.ask("egress", "status")["drops"].get("icmp_unrelated", 0)
    quote = bytes(IP(src=CLIENT, dst=SERVER) / UDP(sport=5998, dport=9999) / Raw(b"x"))[:28]
    send(lab.topo, "server", [IP(src=SERVER, dst=CLIENT) / ICMP(type=3, code=3) / Raw(quote)])
    time.sleep(0.3)
    assert lab.ask("egress", "status")["drops"].get("icmp_unrelated", 0) - before == 1
    assert client.stop() == []


LISTEN = f"""
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SERVER}", 9100))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
time.sleep(6)
"""

CONNECT = f"""
import socket, time
s = socket.socket()
s.bind(("{CLIENT}", 45000))
s.connect(("{SERVER}", 9100))
print("connected", flush=True)
time.sleep(5)
"""


def test_frag_needed_from_the_server_side_reaches_the_client(lab, capture):
    server = lab.spawn("server", [sys.executable, "-c", LISTEN], stdout=-1, text=True)
    assert server.stdout.readline().strip() == "ready"
    client = lab.spawn("client", [sys.executable, "-c", CONNECT], stdout=-1, text=True)
    assert client.stdout.readline().strip() == "connected"
    seen = capture("client", "eth0", "icmp")
    before = lab.ask("egress", "status")["drops"].get("icmp_unrelated", 0)

    def frag_needed(sport: int) -> IP:
        quote = bytes(IP(src=CLIENT, dst=SERVER, flags="DF") / TCP(sport=sport, dport=9100, flags="A"))[:28]
        return IP(src=SERVER, dst=CLIENT) / ICMP(type=3, code=4, nexthopmtu=1280) / Raw(quote)

    send(lab.topo, "server", [frag_needed(45000), frag_needed(45001)])  # live flow; control: none
    time.sleep(0.3)
    got = [p for p in seen.stop() if ICMP in p]
    assert [(p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) for p in got] == [(3, 4, 1280)]
    assert bytes(got[0][ICMP].payload)[20:22] == (45000).to_bytes(2, "big")
    assert lab.ask("egress", "status")["drops"].get("icmp_unrelated", 0) - before == 1
    client.wait(timeout=10)
    server.wait(timeout=10)
