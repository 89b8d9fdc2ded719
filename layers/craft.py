"""Build affinity-encapsulated test packets from a few plain options.

This is what `amesh craft` (and later `amesh send`) runs; keeping it out of
the CLI lets tests and the Scapy shell build the very same packets.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from dataplane.core import header as wire
from dataplane.core.affinity import AffinityHasher
from dataplane.core.packet import ICMP as ICMP_PROTO, ICMPV6 as ICMPV6_PROTO
from dataplane.core.packet import TCP as TCP_PROTO, UDP as UDP_PROTO
from layers.affinity import Affinity

ENCAPS = ("udp", "ether", "none")
PROTOS = {"tcp": TCP_PROTO, "udp": UDP_PROTO, "icmp": ICMP_PROTO}
OUTER_SRC_MAC, OUTER_DST_MAC = "02:00:00:00:00:01", "02:00:00:00:00:02"
DEFAULT_SECRET = b"affinity-mesh-lab-secret"
"""Mesh secret of the default lab. Fine for a lab; set your own anywhere else."""


@dataclass
class CraftSpec:
    """Everything `amesh craft` can set. `code=None` means compute it."""

    src: str = "10.1.0.10"
    dst: str = "10.2.0.10"
    sport: int = 40000
    dport: int = 80
    proto: str = "tcp"
    tcp_flags: str = "S"
    client: int = 1
    chain: int = 1
    index: int = 2
    code: int | None = None
    epoch: int = 1
    flags: list[str] = field(default_factory=list)
    ttl: int = wire.DEFAULT_TTL
    version: int = wire.VERSION
    length: int | None = None
    payload: bytes = b""
    count: int = 1
    encap: str = "udp"
    outer_src: str = "10.99.0.1"
    outer_dst: str = "10.99.0.2"
    udp_port: int = wire.UDP_PORT
    secret: bytes = DEFAULT_SECRET


def inner_packet(spec: CraftSpec, seq_offset: int = 0) -> Packet:
    """The client's own packet (what enters the ingress before encapsulation)."""
    v6 = ipaddress.ip_address(spec.src).version == 6
    if v6 != (ipaddress.ip_address(spec.dst).version == 6):
        raise ValueError("source and destination must both be IPv4 or both IPv6")
    ip: Packet = IPv6(src=spec.src, dst=spec.dst) if v6 else IP(src=spec.src, dst=spec.dst)
    if spec.proto == "tcp":
        l4: Packet = TCP(sport=spec.sport, dport=spec.dport, flags=spec.tcp_flags,
                         seq=1000 + seq_offset)
    elif spec.proto == "udp":
        l4 = UDP(sport=spec.sport, dport=spec.dport)
    else:
        l4 = (ICMPv6EchoRequest(id=spec.sport, seq=seq_offset) if v6
              else ICMP(type=8, id=spec.sport, seq=seq_offset))
    pkt = ip / l4
    if spec.payload:
        pkt = pkt / Raw(spec.payload)
    return pkt


def affinity_code(spec: CraftSpec) -> int:
    """The code the classifier would compute for the spec's flow."""
    v6 = ipaddress.ip_address(spec.src).version == 6
    proto = ICMPV6_PROTO if v6 and spec.proto == "icmp" else PROTOS[spec.proto]
    # an ICMP echo's stream is identified by its echo id on both sides
    dport = spec.sport if spec.proto == "icmp" else spec.dport
    return AffinityHasher(spec.secret).code_of(spec.client, spec.src, spec.sport,
                                               spec.dst, dport, proto)


def craft(spec: CraftSpec) -> list[Packet]:
    """`spec.count` packets of one flow, encapsulated as `spec.encap` says."""
    if spec.encap not in ENCAPS:
        raise ValueError(f"encapsulation must be one of {', '.join(ENCAPS)}")
    code = affinity_code(spec) if spec.code is None else spec.code
    flag_value = 0
    for name in spec.flags:
        flag_value |= wire.FLAG_NAMES[name]
    out = []
    for i in range(spec.count):
        inner = inner_packet(spec, seq_offset=i * len(spec.payload))
        if spec.encap == "none":
            out.append(inner)
            continue
        hdr = Affinity(version=spec.version, flags=flag_value, ttl=spec.ttl,
                       length=spec.length, chain=spec.chain, index=spec.index,
                       code=code, client=spec.client, epoch=spec.epoch)
        if spec.encap == "udp":
            outer: Packet = (Ether(src=OUTER_SRC_MAC, dst=OUTER_DST_MAC) / IP(src=spec.outer_src, dst=spec.outer_dst)
                             / UDP(sport=spec.udp_port, dport=spec.udp_port))
        else:
            outer = Ether(src=OUTER_SRC_MAC, dst=OUTER_DST_MAC, type=wire.ETHERTYPE)
        out.append(outer / hdr / inner)
    return out
