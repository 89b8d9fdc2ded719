"""Issue #14 finding 1 through the lab: crafted TCP segments from the client
host, a real TCP server on the server host that records what its kernel
reassembled. The content rule must hold against the server's reassembly,
not against arrival order.

The crafted client uses an address of the tenant's prefix that no host
owns (`CLIENT`), so no kernel on the client side answers the server's
SYN/ACK with a RST; the SYN/ACK is captured on the server host to learn the
server's initial sequence number. (IP fragments sent in reverse are the
ingress's to reassemble, issue #14 finding 3; their lab test is there.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw

from dataplane.lab.packets import Capture, send

CLIENT, SERVER, PORT = "10.1.0.77", "10.2.0.10", 7070
SINK = r"""
import os, socket, sys, threading
out, talk = sys.argv[2], sys.argv[4:] == ["talk"]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[3])))
s.listen(64)
def serve(c, addr):
    if talk:  # first a byte count and a newline: send that many bytes back
        req = b""
        while not req.endswith(b"\n"):
            req += c.recv(1)
        c.sendall(b"d" * int(req))
    with open(os.path.join(out, str(addr[1])), "ab") as f:
        while True:
            b = c.recv(65536)
            if not b:
                return
            f.write(b)
            f.flush()
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""


def start_sink(lab, out: Path, port: int, *mode: str) -> subprocess.Popen:
    """SINK on the server host, once it listens: each connection's bytes land
    in `out`, in a file named by the client's port."""
    proc = lab.spawn("server", [sys.executable, "-c", SINK, SERVER, str(out), str(port), *mode])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
            line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
            for line in lab.run("server", ["cat", "/proc/net/tcp"]).stdout.splitlines()[1:]):
        time.sleep(0.05)
    return proc



@pytest.fixture(scope="module")
def sink(lab):
    """A TCP server on the server host writing each connection's bytes to
    a file named by the client's port; yields the directory."""
    out = lab.tmp / "sink"
    out.mkdir(exist_ok=True)
    proc = start_sink(lab, out, PORT)
    yield out
    proc.terminate()
    proc.wait(timeout=5)


def drops(lab, reason: str) -> int:
    return sum(lab.ask(i, "status")["drops"].get(reason, 0) for i in ("aa", "ab"))


def connect(lab, tmp_path: Path, sport: int, isn: int) -> int:
    """The crafted client's handshake; returns the server's next sequence
    number. The SYN is sent again if no SYN/ACK shows (a loaded machine)."""
    seen = []
    for attempt in range(3):
        cap = Capture(lab.topo, "server", "eth0", tmp_path / f"synack-{sport}-{attempt}.pcap",
                      f"tcp and src host {SERVER} and src port {PORT} and dst port {sport}")
        send(lab.topo, "client", [IP(src=CLIENT, dst=SERVER) / TCP(sport=sport, dport=PORT, flags="S", seq=isn)])
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and cap.path.stat().st_size <= 24:
            time.sleep(0.05)
        seen = cap.stop()
        synacks = [p for p in seen if TCP in p and p[TCP].flags.S and p[TCP].flags.A]
        if synacks:
            return synacks[0][TCP].seq + 1
    raise AssertionError(f"no SYN/ACK from the server: {[p.summary() for p in seen]}")


def stream(lab, tmp_path: Path, sport: int, segments: list[tuple], sink: Path) -> bytes:
    """Open a connection, send (offset, bytes[, TCP checksum]) segments in
    the given order, and return what the server's application received."""
    isn = 1000 * sport
    server_next = connect(lab, tmp_path, sport, isn)
    pkts = [IP(src=CLIENT, dst=SERVER) / TCP(sport=sport, dport=PORT, flags="A", seq=isn + 1, ack=server_next)]
    for off, data, *chksum in segments:
        t = TCP(sport=sport, dport=PORT, flags="PA", seq=isn + 1 + off, ack=server_next)
        if chksum:
            t.chksum = chksum[0]
        pkts.append(IP(src=CLIENT, dst=SERVER) / t / Raw(data))
    send(lab.topo, "client", pkts)
    time.sleep(1.0)
    path = sink / str(sport)
    return path.read_bytes() if path.exists() else b""


def test_reverse_order_segments_never_reach_the_server(lab, sink, tmp_path):
    """Before the fix the server reassembled SECRET-TOKEN from these."""
    before = drops(lab, "out_of_order"), drops(lab, "blocked")
    got = stream(lab, tmp_path, 45001, [(7, b"TOKEN"), (0, b"SECRET-")], sink)
    assert b"SECRET-TOKEN" not in got and got == b"SECRET-"
    assert drops(lab, "out_of_order") > before[0]
    got = stream(lab, tmp_path, 45002, [(8, b"OKEN"), (0, b"SECR"), (4, b"ET-T"), (8, b"OKEN")], sink)
    assert b"SECRET-TOKEN" not in got
    assert drops(lab, "blocked") > before[1]


def test_bad_checksum_segment_is_not_what_is_inspected(lab, sink, tmp_path):
    """The server's kernel discards the bad-checksum XXXXX and keeps the
    TOKEN sent after it; before the fix the inspection scanned XXXXX and
    let TOKEN pass as a retransmission."""
    before = drops(lab, "bad_checksum")
    got = stream(lab, tmp_path, 45005, [(0, b"SECRET-"), (7, b"XXXXX", 0x1234), (7, b"TOKEN")], sink)
    assert b"SECRET-TOKEN" not in got and got == b"SECRET-"
    assert drops(lab, "bad_checksum") == before + 1


def test_in_order_token_is_blocked_and_benign_stream_reaches_the_server(lab, sink, tmp_path):
    """Controls: the same bytes in order are blocked at the token; a benign
    stream, even reordered by the network, reaches the server whole once
    its sender retransmits."""
    before = drops(lab, "blocked")
    got = stream(lab, tmp_path, 45003, [(0, b"SECRET-"), (7, b"TOKEN")], sink)
    assert got == b"SECRET-" and drops(lab, "blocked") > before
    got = stream(lab, tmp_path, 45004, [(6, b"world"), (0, b"hello "), (6, b"world")], sink)
    assert got == b"hello world"


TALK_CLIENT = r"""
import socket, sys, time
server, port, sport, down, up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
c = socket.socket()
c.bind(("", sport))
c.settimeout(20)
c.connect((server, port))
c.sendall(b"%d\n" % down)
got = 0
while got < down:
    b = c.recv(65536)
    if not b:
        break
    got += len(b)
c.sendall(b"u" * up + b"SECRET-TOKEN")
time.sleep(1.5)
print(got)
"""


def test_inspection_limit_counts_per_direction(lab, tmp_path):
    """1.2 MiB from the server leaves the client's direction inspected (it
    turned the whole flow to allow before the fix); control: 1.2 MiB from
    the client itself ends the inspection of its direction."""
    out = tmp_path / "talk"
    out.mkdir()
    out.chmod(0o777)
    proc = start_sink(lab, out, 7071, "talk")
    try:
        big = 1200 * 1024
        for sport, down, up, reaches in ((45010, big, 0, False), (45011, 0, big, True)):
            res = lab.run("client", [sys.executable, "-c", TALK_CLIENT, SERVER, "7071", str(sport),
                                     str(down), str(up)], timeout=60)
            assert res.returncode == 0 and int(res.stdout) == down, res.stderr
            time.sleep(0.5)
            got = (out / str(sport)).read_bytes() if (out / str(sport)).exists() else b""
            assert (b"SECRET-TOKEN" in got) is reaches, (sport, len(got))
    finally:
        proc.terminate()
        proc.wait(timeout=5)
