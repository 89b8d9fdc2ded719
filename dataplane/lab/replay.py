"""Replay both halves of a capture's conversation through the lab's chain.

The mapping (documented here and in the README, checked by the tests):

* the *client* of the capture is the sender of the first TCP SYN without ACK,
  else the source of the first IPv4 packet (``client_ip`` overrides); its
  *server* is the destination of its first packet;
* the packets between those two are replayed, both directions, in capture
  order: the client's from the lab host of the chosen tenant (default
  ``client``), the server's from the lab's ``server`` (other conversations
  are left out, counted); each run of packets from one side is sent from
  that side's host, and the other side answers only after it crossed the
  chain (`packets.send_session`);
* IPv4 addresses -> those lab hosts'; Ethernet source -> the sender's MAC,
  destination -> its gateway's (its edge's) MAC;
* IPv4 header checksum and TCP/UDP checksums are recomputed; nothing else
  changes: ports, sequence numbers, IP ids, TTLs, options and payloads are
  replayed byte for byte;
* frames larger than the host link's MTU (a capture taken with GRO/TSO on)
  cannot be replayed and are counted as ``too_big``;
* while a TCP or UDP conversation replays, both lab hosts' kernels are deaf
  to the server's port (`packets.deaf`): a real stack answering recorded
  packets would contradict the recording (an ICMP conversation is replayed
  as is: the lab server's kernel answers echo requests too).

So each host's capture of a replay equals the other side's rewritten half,
modulo the edges' Ethernet addresses, and the chain's stateful services see
the whole conversation as a real flow (the firewall tracks both windows).
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from dataplane.lab import packets
from dataplane.lab.packets import deaf
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
    service: tuple[int, int] | None = None
    """(protocol, port) of the server's side, for TCP and UDP."""
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
    server = "server"
    lab_ip = {client_ip: topo.hosts[host].address.ip, server_ip: topo.hosts[server].address.ip}
    sender = {client_ip: host, server_ip: server}
    out = Rewritten([], client_ip, server_ip)
    for t, p in frames:
        if IP not in p or {p[IP].src, p[IP].dst} != {client_ip, server_ip}:
            out.skipped["other_conversation"] += 1
            continue
        ip = p[IP].copy()
        if len(ip) > HOST_MTU:
            out.skipped["too_big"] += 1
            continue
        src = sender[ip.src]
        if src == host and out.service is None:
            for layer, proto in ((TCP, 6), (UDP, 17)):
                if layer in ip:
                    out.service = proto, ip[layer].dport
        ip.src, ip.dst = str(lab_ip[ip.src]), str(lab_ip[ip.dst])
        del ip.chksum
        if TCP in ip:
            del ip[TCP].chksum
        elif UDP in ip:
            del ip[UDP].chksum
        frame = Ether(bytes(Ether(src=topo.mac_of(src), dst=topo.mac_of(topo.hosts[src].attach)) / ip))
        frame.time = t
        out.packets.append(frame)
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
    quiet = rw.service
    try:
        with deaf(topo, [host, "server"], quiet[1], quiet[0]) if quiet else nullcontext():
            sent = packets.send_session(topo, rw.packets, fast=fast)
    finally:
        recorded = {name: len(c.stop()) for name, c in caps.items()}
    return {"replayed": sent, "client_in_capture": rw.client, "server_in_capture": rw.server,
            "skipped": dict(rw.skipped), "recorded": recorded}
