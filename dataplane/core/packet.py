"""Parse an inner IPv4/IPv6 packet into the few fields the dataplane needs.

The per-packet path cannot afford Scapy (about 10k dissections/s), so this is
a `struct`-only parser that reads exactly what hashing, flow lookup and the
services use, and raises `PacketError(reason)` on anything it cannot trust.
The reason strings double as drop-counter names.
"""

from __future__ import annotations

import struct

TCP, UDP, ICMP, ICMPV6, SCTP, UDPLITE = 6, 17, 1, 58, 132, 136
PORTED = frozenset({TCP, UDP, SCTP, UDPLITE})
ICMP_ECHO = {ICMP: (8, 0), ICMPV6: (128, 129)}
ICMP_ERRORS = {ICMP: frozenset({3, 4, 5, 11, 12}), ICMPV6: frozenset({1, 2, 3, 4})}
V6_EXT_HEADERS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
V6_FRAGMENT = 44
ICMPV6_TOO_BIG = 2
ICMPV6_LINK_LOCAL = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})
"""MLD (130-132, 143) and neighbour discovery (133-137: router and
neighbour solicitation and advertisement, redirect): a link's own business,
answered by the kernel on each link, never carried through a chain."""
IPV6_MIN_MTU = 1280

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_V4 = struct.Struct("!BBHHHBBH4s4s")
_PORTS = struct.Struct("!HH")
_TCP = struct.Struct("!HHIIBBH")


class PacketError(ValueError):
    """An inner packet the dataplane refuses; `reason` names the drop counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Inner:
    """What the dataplane knows about one inner IP packet.

    `sport`/`dport` are the ports used for the flow identity: real ports for
    TCP/UDP/SCTP/UDP-Lite, the echo id on both sides for ICMP echo, and 0 for
    other protocols and for every fragment (a fragment after the first has no
    ports, so all fragments of a datagram are identified by addresses only).
    """

    __slots__ = ("family", "src", "dst", "proto", "sport", "dport", "fragment",
                 "l4", "tcp_flags", "seq", "ack", "window", "payload", "length",
                 "icmp_error", "wscale", "segment", "csum_partial")

    def __init__(self) -> None:
        self.family = 4
        self.src = self.dst = b""
        self.proto = 0
        self.sport = self.dport = 0
        self.fragment = False
        self.l4 = 0
        self.tcp_flags = 0
        self.seq = self.ack = self.window = 0
        self.payload: bytes | memoryview = b""
        self.length = 0
        self.icmp_error: Inner | None = None
        self.wscale = -1
        """A SYN's window scale option (RFC 7323), -1 without one; parsed
        only for SYNs, which alone may carry it (the firewall's window)."""
        self.segment: bytes | memoryview = b""
        """The whole TCP/UDP segment (header and payload), for `transport_checksum_ok`."""
        self.csum_partial = False
        """The sending host left the transport checksum to the receiver
        (checksum offload, a GSO option on the affinity header): it cannot be
        verified here. Set by the node that read the header."""

    def __repr__(self) -> str:
        return (f"Inner(v{self.family} proto={self.proto} {self.src.hex()}:{self.sport}"
                f" > {self.dst.hex()}:{self.dport} len={self.length})")


def parse(buf: bytes | memoryview, offset: int = 0, *, embedded: bool = False) -> Inner:
    """Parse the IP packet starting at `offset`.

    `embedded` parses the truncated copy inside an ICMP error (8 bytes of
    transport header at most), which is allowed to be short.
    """
    if len(buf) - offset < 1:
        raise PacketError("inner_truncated")
    version = buf[offset] >> 4
    if version == 4:
        p = _parse_v4(buf, offset, embedded)
    elif version == 6:
        p = _parse_v6(buf, offset, embedded)
    else:
        raise PacketError("inner_not_ip")
    if not p.fragment:
        _parse_l4(p, buf, embedded)
    return p


def _parse_v4(buf: bytes | memoryview, off: int, embedded: bool) -> Inner:
    if len(buf) - off < 20:
        raise PacketError("inner_truncated")
    vihl, _tos, total, _id, frag, _ttl, proto, _ck, src, dst = _V4.unpack_from(buf, off)
    ihl = (vihl & 0xF) * 4
    if ihl < 20 or (total < ihl and not embedded):
        raise PacketError("inner_bad_ip_header")
    end = off + total
    if end > len(buf):
        if not embedded:
            raise PacketError("inner_truncated")
        end = len(buf)
    p = Inner()
    p.family, p.src, p.dst, p.proto = 4, src, dst, proto
    p.fragment = bool(frag & 0x3FFF)
    p.l4 = off + ihl
    p.length = end - off
    p.payload = buf[p.l4:end]
    return p


def _parse_v6(buf: bytes | memoryview, off: int, embedded: bool) -> Inner:
    if len(buf) - off < 40:
        raise PacketError("inner_truncated")
    plen = struct.unpack_from("!H", buf, off + 4)[0]
    nxt = buf[off + 6]
    end = off + 40 + plen
    if end > len(buf):
        if not embedded:
            raise PacketError("inner_truncated")
        end = len(buf)
    p = Inner()
    p.family = 6
    p.src = bytes(buf[off + 8:off + 24])
    p.dst = bytes(buf[off + 24:off + 40])
    pos = off + 40
    while nxt in V6_EXT_HEADERS or nxt == V6_FRAGMENT:
        if pos + 8 > end:
            raise PacketError("inner_truncated")
        if nxt == V6_FRAGMENT:
            p.fragment = True
            nxt, pos = buf[pos], pos + 8
        else:
            nxt, pos = buf[pos], pos + (buf[pos + 1] + 1) * 8
    if pos > end:
        raise PacketError("inner_truncated")  # the last extension header runs past the payload
    p.proto = nxt
    p.l4 = pos
    p.length = end - off
    p.payload = buf[pos:end]
    return p


def _parse_l4(p: Inner, buf: bytes | memoryview, embedded: bool) -> None:
    seg = p.payload
    if p.proto in PORTED:
        if len(seg) < 4:
            raise PacketError("inner_truncated")
        p.sport, p.dport = _PORTS.unpack_from(seg)
        if not embedded:
            p.segment = seg
        if p.proto == TCP and not embedded:
            if len(seg) < 20:
                raise PacketError("inner_truncated")
            _sp, _dp, p.seq, p.ack, dataofs, p.tcp_flags, p.window = _TCP.unpack_from(seg)
            hl = (dataofs >> 4) * 4
            if hl < 20 or hl > len(seg):
                raise PacketError("inner_bad_tcp_header")
            if p.tcp_flags & TCP_SYN and hl > 20:
                p.wscale = _wscale(seg, hl)
            p.payload = seg[hl:]
        elif p.proto == UDP and not embedded:
            p.payload = seg[8:]
    elif p.proto in ICMP_ECHO:
        if len(seg) < 8 and not embedded:
            raise PacketError("inner_truncated")
        if len(seg) >= 8:
            icmp_type = seg[0]
            if icmp_type in ICMP_ECHO[p.proto]:
                p.sport = p.dport = struct.unpack_from("!H", seg, 4)[0]
            elif icmp_type in ICMP_ERRORS[p.proto] and not embedded:
                p.icmp_error = _quote(seg)


def _quote(seg: bytes | memoryview) -> Inner:
    """The packet an ICMP error quotes (RFC 792: its IP header and at least
    8 bytes after it, enough for the ports). An error whose quote falls
    short cannot be related to a flow, so it is refused, not passed on as
    some other ICMP packet."""
    try:
        q = parse(seg, 8, embedded=True)
    except PacketError:
        raise PacketError("icmp_bad_quote") from None
    if len(q.payload) < 8:
        raise PacketError("icmp_bad_quote")
    return q


def _wscale(seg: bytes | memoryview, hl: int) -> int:
    """The window scale option among a TCP header's options, -1 if none
    (or the options are malformed: then no option is trusted)."""
    i = 20
    while i < hl:
        kind = seg[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= hl or seg[i + 1] < 2 or i + seg[i + 1] > hl:
            return -1
        if kind == 3 and seg[i + 1] == 3:
            return min(seg[i + 2], 14)
        i += seg[i + 1]
    return -1


def tcp_reset(p: Inner) -> bytes:
    """A TCP RST answering packet `p` (RFC 9293 section 3.10.7.1), checksums
    computed: what a firewall sends to reject a connection attempt."""
    payload_len = len(p.payload) + (1 if p.tcp_flags & (TCP_SYN | TCP_FIN) else 0)
    if p.tcp_flags & TCP_ACK:
        seq, ack, flags = p.ack, 0, TCP_RST
    else:
        seq, ack, flags = 0, (p.seq + payload_len) % (1 << 32), TCP_RST | TCP_ACK
    seg = bytearray(_TCP.pack(p.dport, p.sport, seq, ack, 5 << 4, flags, 0) + b"\x00\x00\x00\x00")
    if p.family == 4:
        pseudo = p.dst + p.src + struct.pack("!BBH", 0, TCP, len(seg))
    else:
        pseudo = p.dst + p.src + struct.pack("!IxxxB", len(seg), TCP)
    struct.pack_into("!H", seg, 16, checksum(pseudo + seg))
    if p.family == 4:
        ip = bytearray(_V4.pack(0x45, 0, 20 + len(seg), 0, 0x4000, 64, TCP, 0, p.dst, p.src))
        struct.pack_into("!H", ip, 10, checksum(ip))
    else:
        ip = bytearray(struct.pack("!IHBB", 6 << 28, len(seg), TCP, 64) + p.dst + p.src)
    return bytes(ip + seg)


def link_local(ip: bytes | memoryview, own: frozenset[bytes] = frozenset()) -> bool:
    """Whether an IP packet a host sent on its link is the link's own
    business, for the edge's kernel and not for the chain: addressed to one
    of the edge's `own` addresses, broadcast or multicast (ARP-resolved
    gateway traffic, IPv4 224/4, IPv6 ff00::/8); for IPv6 also link-local
    addresses (fe80::/10, the unspecified source of duplicate address
    detection) and ICMPv6 neighbour discovery and MLD whatever their
    address. The edges must leave these to the kernel: carried through the
    chain, neighbour discovery would break on the far link. Judged on the
    first bytes only (it runs for every frame the edge reads)."""
    if len(ip) >= 20 and ip[0] >> 4 == 4:
        dst = bytes(ip[16:20])
        return dst in own or dst[0] >= 224
    if len(ip) < 40 or ip[0] >> 4 != 6:
        return False
    src, dst = bytes(ip[8:24]), bytes(ip[24:40])
    if dst in own or dst[0] == 0xFF or (dst[0] == 0xFE and dst[1] & 0xC0 == 0x80):
        return True
    if (src[0] == 0xFE and src[1] & 0xC0 == 0x80) or not any(src):
        return True
    return ip[6] == ICMPV6 and len(ip) > 40 and ip[40] in ICMPV6_LINK_LOCAL


def too_big(packet: bytes | memoryview, mtu: int) -> bytes:
    """An ICMPv6 Packet Too Big (RFC 4443 section 3.2) about an IPv6
    `packet` that does not fit a link of `mtu` bytes, from the packet's
    destination to its source, quoting as much of it as fits in the
    minimum IPv6 MTU. An IPv6 packet is never fragmented on its way (RFC
    8200 section 5): its sender learns the path MTU from this message and
    sends smaller packets. It claims the destination's address because the
    edge that sends it has none in the flow; the sender's stack matches the
    message to its connection by the quoted header."""
    src, dst = bytes(packet[8:24]), bytes(packet[24:40])
    body = bytearray(struct.pack("!BBHI", ICMPV6_TOO_BIG, 0, 0, mtu)
                     + bytes(packet[:IPV6_MIN_MTU - 48]))
    pseudo = dst + src + struct.pack("!IxxxB", len(body), ICMPV6)
    struct.pack_into("!H", body, 2, checksum(pseudo + body))
    return struct.pack("!IHBB", 6 << 28, len(body), ICMPV6, 64) + dst + src + bytes(body)


def transport_checksum_ok(p: Inner) -> bool:
    """Whether a TCP or UDP segment's checksum (over the pseudo-header) is
    right, as the receiving host will check it: a middlebox that inspects a
    segment the host then discards for its checksum has inspected bytes the
    host never saw. True for other protocols, for a UDP checksum of 0 (none),
    and when `p.csum_partial` says the checksum is not filled in yet."""
    if p.csum_partial or p.proto not in (TCP, UDP) or not p.segment:
        return True
    seg = bytes(p.segment)
    if p.proto == UDP and len(seg) >= 8 and seg[6:8] == b"\x00\x00":
        return True
    if p.family == 4:
        pseudo = p.src + p.dst + struct.pack("!BBH", 0, p.proto, len(seg))
    else:
        pseudo = p.src + p.dst + struct.pack("!IxxxB", len(seg), p.proto)
    return checksum(pseudo + seg) == 0


def checksum(data: bytes | bytearray) -> int:
    """The Internet checksum (RFC 1071) of `data`.

    The one's complement sum of the 16-bit words is congruent to the
    big-endian integer of the bytes modulo 0xFFFF (2**16 = 1 mod 0xFFFF), so
    it is one big-integer remainder, not a loop over the words (about 4x
    faster on 1400 bytes); the sum is 0xFFFF, not 0, for data not all zero."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    whole = int.from_bytes(data, "big")
    total = whole % 0xFFFF or (0xFFFF if whole else 0)
    return ~total & 0xFFFF
