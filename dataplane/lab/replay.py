"""Replay a capture's client-to-server packets into the lab's client side.

The mapping (documented here and in the README, checked by the tests):

* the *client* of the capture is the sender of the first TCP SYN without ACK,
  else the source of the first IPv4 packet (``client_ip`` overrides);
* only packets from the client to the server it talks to are replayed
  (other conversations and the server's replies are left out: the lab's
  server answers for itself);
* IPv4 source -> the lab host of the chosen tenant (default ``client``),
  IPv4 destination -> the lab's ``server``; Ethernet source -> that host's
  MAC, destination -> its gateway's (the edge's) MAC;
* IPv4 header checksum and TCP/UDP checksums are recomputed; nothing else
  changes: ports, sequence numbers, IP ids, TTLs, options and payloads are
  replayed byte for byte;
* frames larger than the host link's MTU (a capture taken with GRO/TSO on)
  cannot be replayed and are counted as ``too_big``.

So the server-side capture of a replay equals the rewritten input, modulo
the egress's Ethernet addresses. The chain's stateful services see the
replayed flows as real flows (a firewall sees the SYN first).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from dataplane.lab import packets
from dataplane.lab.topology import Topology
from layers.describe import dissect
from layers.pcap import read_frames

HOST_MTU = 1500


class ReplayError(ValueError):
    """The capture cannot be replayed; the message says why."""


@dataclass
class Rewritten:
    packets: list[Packet]
    client: str
    server: str
    times: list[float] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def host_for_tenant(topo: Topology, tenant: int | None) -> str:
    """The lab host that sends as `tenant` (its address is in the tenant's prefixes)."""
    import ipaddress

    if tenant is None:
        return "client"
    t = next((t for t in topo.tenants if t["id"] == tenant), None)
    if t is None:
        raise ReplayError(f"no tenant {tenant} in the lab")
    nets = [ipaddress.ip_network(p) for p in t["prefixes"]]
    for h in topo.hosts.values():
        if any(h.address.ip in n for n in nets) and h.attach == topo.ingress.name:
            return h.name
    raise ReplayError(f"no lab host belongs to tenant {tenant}")


def rewrite(topo: Topology, pcap: str, host: str = "client", client_ip: str | None = None) -> Rewritten:
    frames = [(f.time, dissect(f.data, f.linktype)) for f in read_frames(pcap)]
    ips = [(t, p) for t, p in frames if IP in p]
    if not ips:
        raise ReplayError(f"{pcap}: no IPv4 packets to replay")
    if client_ip is None:
        syn = next((p for _, p in ips if TCP in p and p[TCP].flags & 0x12 == 0x02), None)
        client_ip = (syn or ips[0][1])[IP].src
    server_ip = next((p[IP].dst for _, p in ips if p[IP].src == client_ip), None)
    if server_ip is None:
        raise ReplayError(f"{pcap}: no packet from {client_ip}")
    h = topo.hosts[host]
    server = topo.hosts["server"]
    out = Rewritten([], client_ip, server_ip)
    for t, p in frames:
        if IP not in p or p[IP].src != client_ip or p[IP].dst != server_ip:
            out.skipped["other_direction_or_conversation"] += 1
            continue
        ip = p[IP].copy()
        if len(ip) > HOST_MTU:
            out.skipped["too_big"] += 1
            continue
        ip.src, ip.dst = str(h.address.ip), str(server.address.ip)
        del ip.chksum
        if TCP in ip:
            del ip[TCP].chksum
        elif UDP in ip:
            del ip[UDP].chksum
        frame = Ether(src=topo.mac_of(host), dst=topo.mac_of(h.attach)) / ip
        frame.time = t
        out.packets.append(Ether(bytes(frame)))
        out.packets[-1].time = t
        out.times.append(t)
    if not out.packets:
        raise ReplayError(f"{pcap}: nothing left to replay ({dict(out.skipped)})")
    return out


HOPS_FILTER = "udp port 6886"


def capture_points(topo: Topology, host: str) -> dict[str, tuple[str, str, str]]:
    """name -> (node, interface, filter) for a per-hop recording."""
    points = {host: (host, "eth0", "")}
    for node in topo.forwarders():
        if node != topo.controller:
            points[f"fabric-{node}"] = (node, "fab0", f"dst host {topo.fabric_ip(node)} and {HOPS_FILTER}")
    points["server"] = ("server", "eth0", "")
    return points


def replay(topo: Topology, pcap: str, host: str = "client", client_ip: str | None = None,
           fast: bool = False, capture: Path | None = None) -> dict[str, object]:
    rw = rewrite(topo, pcap, host, client_ip)
    caps = {}
    if capture is not None:
        capture.mkdir(parents=True, exist_ok=True)
        capture.chmod(0o755)
        for name, (node, iface, bpf) in capture_points(topo, host).items():
            caps[name] = packets.Capture(topo, node, iface, capture / f"{name}.pcap", bpf)
    try:
        result = packets.send(topo, host, rw.packets, fast=fast)
    finally:
        recorded = {name: len(c.stop()) for name, c in caps.items()}
    return {"replayed": result["sent"], "client_in_capture": rw.client, "server_in_capture": rw.server,
            "skipped": dict(rw.skipped), "recorded": recorded}
