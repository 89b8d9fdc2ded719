"""Put hand-crafted packets into a lab node, and capture what comes out.

`send` writes the packets to a pcap and runs `dataplane.lab.inject` inside
the node's namespace: a host sends them out of its `eth0` (bare IP packets
get the host's and its gateway's MACs), an edge out of its hosts bridge, and
a forwarder receives encapsulated packets on its own fabric socket as if
another forwarder had sent them. `Capture` runs tcpdump inside a namespace
and hands back Scapy packets. Both are what `amesh send`, `amesh replay`,
the Scapy shell helpers and the golden tests use.

A crafted TCP session through the stateful chain must be two-sided: the
firewall tracks each direction's window as conntrack does, so a client's
ACK for a SYN/ACK nobody sent is out of window. `send_session` sends every
packet from the host whose address is its source, in order, and `deaf`
keeps the hosts' own kernels from answering crafted packets (a RST from
the real server to a crafted SYN would close the flow).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether
from scapy.packet import Packet
from scapy.utils import rdpcap, wrpcap

from dataplane.lab import netns
from dataplane.lab.inject import ETH_P_ALL
from dataplane.lab.topology import Topology


class SendError(RuntimeError):
    """The packets could not be sent; the message says why."""


def frames_for(topo: Topology, node: str, pkts: list[Packet]) -> list[Packet]:
    """Give bare IP packets from a host the Ethernet header its NIC would."""
    if topo.role(node) != "host":
        return pkts
    host = topo.hosts[node]
    src, dst = topo.mac_of(node), topo.mac_of(host.attach)
    return [p if isinstance(p, Ether) else Ether(src=src, dst=dst) / p for p in pkts]


def send(topo: Topology, node: str, pkts: list[Packet] | str, iface: str | None = None,
         fast: bool = True) -> dict[str, int]:
    """Send `pkts` (or a pcap file's frames) into `node`; returns counts."""
    role = topo.role(node)
    if isinstance(pkts, str):
        path, tmp = pkts, None
    else:
        fd, tmp = tempfile.mkstemp(suffix=".pcap")
        os.close(fd)
        wrpcap(tmp, frames_for(topo, node, pkts))
        path = tmp
    os.chmod(path, 0o644)
    if iface is not None:
        target = ["--iface", iface]
    elif role == "host":
        target = ["--iface", "eth0"]
    elif role in ("ingress", "egress"):
        target = ["--iface", "hbr0"]
    else:
        target = ["--udp-to", topo.fabric_ip(node)]
    argv = [sys.executable, "-m", "dataplane.lab.inject", "--pcap", path, *target]
    if fast:
        argv.append("--fast")
    try:
        res = netns.run(topo.netns(node), argv, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    finally:
        if tmp:
            os.unlink(tmp)
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SendError(f"injector failed in {node}: {res.stderr.strip()[-500:]}") from None
    if "error" in out:
        raise SendError(out["error"])
    return out


def send_session(topo: Topology, pkts: list[Packet], wait: float = 1.0, fast: bool = True) -> int:
    """Send a two-sided session in order, each packet out of the `eth0` of
    the lab host whose address is its IPv4 source. When the sending side
    changes, the other side answers only once the last packet sent reached
    it (seen on its `eth0`), or after `wait` seconds (the chain may drop
    it), and not before the capture's own gap unless `fast`. One process,
    one socket per host (`netns.socket_in`), so a long conversation does not
    start a child per turn. Returns packets sent."""
    by_ip = {str(h.address.ip): name for name, h in topo.hosts.items()}
    socks: dict[str, socket.socket] = {}
    last: tuple[str, bytes, float] | None = None
    try:
        for host in set(by_ip.values()):
            socks[host] = netns.socket_in(topo.netns(host), socket.AF_PACKET, socket.SOCK_RAW,
                                          socket.htons(ETH_P_ALL))
            socks[host].bind(("eth0", 0))
        for p in pkts:
            if IP not in p or p[IP].src not in by_ip:
                raise SendError(f"no lab host has the source of {p.summary()}")
            host = by_ip[p[IP].src]
            if last is not None:
                if last[0] != host:
                    _arrival(socks[host], last[1], wait)
                if not fast:
                    time.sleep(min(max(float(p.time) - last[2], 0.0), 10.0))
            ip = bytes(p[IP])
            try:
                socks[host].send(bytes(frames_for(topo, host, [p])[0]))
            except OSError as exc:
                raise SendError(f"sending {p.summary()} from {host}: {exc}") from None
            last = host, ip, float(p.time)
    finally:
        for s in socks.values():
            s.close()
    return len(pkts)


def _arrival(sock: socket.socket, ip: bytes, wait: float) -> bool:
    """Wait until `sock` receives the IPv4 packet `ip` (same addresses, id,
    protocol and first 8 transport bytes: what the chain does not change)."""
    ihl = (ip[0] & 0xF) * 4
    key = ip[4:6] + ip[9:10] + ip[12:20] + ip[ihl:ihl + 8]
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        frame, addr = sock.recvfrom(65535)
        got = frame[14:]
        if addr[2] != socket.PACKET_OUTGOING and len(got) >= 20:
            gihl = (got[0] & 0xF) * 4
            if got[4:6] + got[9:10] + got[12:20] + got[gihl:gihl + 8] == key:
                return True
    return False


# Policy-rule priorities while a host is deaf: the kernel consults rules in
# priority order and `local` (delivery to this host) sits at 0, so it moves
# behind the blackhole rules for the duration and back afterwards.
_DEAF, _LOCAL = 10, 100
_TCP = 6


@contextmanager
def deaf(topo: Topology, hosts: list[str], port: int, proto: int = _TCP) -> Iterator[None]:
    """While inside, the kernels of lab `hosts` neither take nor send
    `proto` packets to or from `port` (policy routing blackholes them;
    tcpdump on the host still sees what arrives): a crafted two-sided
    session then meets no RST from a real stack. Restored on exit, also
    after a failure half-way."""
    blackholes = [{"priority": _DEAF, "action": "FR_ACT_BLACKHOLE", "ip_proto": proto,
                   f"{side}_range": f"{port}:{port}"} for side in ("sport", "dport")]
    steps = [("add", {"priority": _LOCAL, "table": 255}), ("del", {"priority": 0, "table": 255}),
             *(("add", r) for r in blackholes)]
    undo = [*(("del", r) for r in blackholes), ("add", {"priority": 0, "table": 255}),
            ("del", {"priority": _LOCAL, "table": 255})]
    touched: list[str] = []
    try:
        for host in hosts:
            touched.append(host)
            with IPRoute(netns=topo.netns(host), flags=0) as ip:
                for op, rule in steps:
                    ip.rule(op, family=2, **rule)
        yield
    finally:
        for host in touched:
            with IPRoute(netns=topo.netns(host), flags=0) as ip:
                for op, rule in undo:
                    try:
                        ip.rule(op, family=2, **rule)
                    except NetlinkError:
                        pass  # that step had not been done


class Capture:
    """tcpdump on one interface of one node, for the life of the object."""

    def __init__(self, topo: Topology, node: str, iface: str, path: Path, bpf: str = "") -> None:
        self.path = path
        self.proc = netns.spawn(topo.netns(node), ["tcpdump", "--immediate-mode", "-i", iface, "-w", str(path), "-U",
                                                   "-s", "0", *bpf.split()],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while not path.exists() and time.monotonic() < deadline:  # tcpdump opened the file
            time.sleep(0.02)
        time.sleep(0.2)

    def stop(self) -> list[Packet]:
        if self.proc.poll() is None:
            time.sleep(0.2)  # let the last packets land
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return list(rdpcap(str(self.path))) if self.path.exists() and self.path.stat().st_size > 24 else []
