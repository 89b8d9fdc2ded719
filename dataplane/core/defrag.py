"""IPv4 fragment reassembly at the edges, bounded, on the node's clock.

Why the edges reassemble: only a datagram's first fragment carries its
ports, so a fragment cannot be classified (tenant chain by server port),
hashed (the affinity code covers the ports) or judged by a service (a SYN
with MF set to a denied port, a content rule split across fragments) on its
own. The ingress (client packets) and the egress (server packets: it finds
their flow by ports) therefore hand every fragment to a `Defrag` and
classify and forward only the whole datagram; nothing behind them ever sees
a fragment of a datagram they reassembled.

The chosen way across the fabric: the whole datagram travels as one inner
packet. A datagram bigger than the fabric MTU is fragmented by the sending
forwarder's kernel as an *outer* UDP datagram and reassembled by the
receiving forwarder's kernel; the far edge re-fragments it to its host link
MTU (`fragment`) before delivery, which the original sender allowed (it
fragmented, so DF was clear; a datagram with DF set is never fragmented).
The other way (re-fragment at the ingress into inner fragments that all
carry the first one's affinity code) would have the services see fragments
again, which is what this module exists to prevent.

Policy (every drop has a reason in `dataplane.core.reasons`):

* fragments of one datagram are keyed (src, dst, protocol, IP id) and held
  as sorted-by-nothing pieces; a datagram is complete when the last
  fragment (MF clear) is in and the pieces cover 0..end with no hole;
* overlapping fragments whose bytes agree are accepted (a retransmission);
  ones that disagree, or two different ends, drop the whole datagram
  (`frag_overlap`): which copy a receiver keeps differs between stacks, the
  classic way to show a filter one datagram and the server another;
* a first fragment too short for its full transport header (`frag_tiny`,
  RFC 1858), a fragment that is not a multiple of 8 bytes but not the last
  (`frag_malformed`), or a datagram past 65,535 bytes (`frag_too_big`) is
  dropped;
* at most `max_datagrams` datagrams and `max_bytes` bytes in progress, at
  most `max_pieces` fragments each: a fragment that would pass a limit is
  dropped (`frag_limit`) and so is its datagram; datagrams in progress are
  never evicted to make room, so a flood of first fragments cannot push a
  client's real datagram out, only wait `timeout` for it to go away;
* a datagram not complete `timeout` seconds after its first fragment
  arrived is dropped (`frag_timeout`), checked on every fragment (oldest
  first, in O(1) per expired datagram) and by `expire`.

IPv6 fragments are not reassembled here (a separate, still open piece of
work); the edges drop them (`frag_unsupported`), a stated policy rather
than letting them bypass classification.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field

from dataplane.core.packet import ICMP, SCTP, TCP, UDP, UDPLITE, PacketError, checksum

MAX_DATAGRAM = 65535
MIN_L4 = {TCP: 20, UDP: 8, UDPLITE: 8, ICMP: 8, SCTP: 12}
"""Bytes of transport header the first fragment must hold whole."""
_DF, _MF, _OFFSET = 0x4000, 0x2000, 0x1FFF


@dataclass(slots=True)
class _Datagram:
    """One datagram in progress."""

    started: float
    header: bytes = b""
    """The first fragment's IP header (known once offset 0 arrived)."""
    pieces: dict[int, bytes] = field(default_factory=dict)
    """Offset in bytes -> payload."""
    end: int = -1
    """Payload length, known once the last fragment (MF clear) arrived."""
    held: int = 0


class Defrag:
    """Reassembles IPv4 datagrams from their fragments within fixed bounds.

    `drops` is the owner's drop counter: datagrams that time out or are
    dropped while other fragments arrive are counted there; the fate of the
    fragment being pushed is raised as `PacketError(reason)` for the caller
    to count like any refused packet.
    """

    def __init__(self, drops: Counter[str], max_datagrams: int = 1024, max_bytes: int = 4 << 20,
                 max_pieces: int = 256, timeout: float = 2.0) -> None:
        self.drops = drops
        self.max_datagrams = max_datagrams
        self.max_bytes = max_bytes
        self.max_pieces = max_pieces
        self.timeout = timeout
        self.held = 0
        """Bytes of fragments held, over all datagrams in progress."""
        self._dgrams: dict[tuple[bytes, bytes, int, int], _Datagram] = {}
        """In order of first arrival, which is the order of expiry."""

    def __len__(self) -> int:
        return len(self._dgrams)

    def expire(self, now: float) -> None:
        """Drop the datagrams that waited more than `timeout` (oldest first)."""
        while self._dgrams:
            key, d = next(iter(self._dgrams.items()))
            if now - d.started < self.timeout:
                return
            self._forget(key, d)
            self.drops["frag_timeout"] += 1

    def push(self, packet: bytes | memoryview, now: float) -> bytes | None:
        """Take one IPv4 fragment (the whole IP packet, no trailing bytes);
        return the reassembled datagram when this fragment completed it,
        None while it is held. Raise `PacketError` when the fragment (and
        with it its datagram) is dropped."""
        self.expire(now)
        vihl, _tos, total, ident, frag, _ttl, proto, _ck, src, dst = struct.unpack_from(
            "!BBHHHBBH4s4s", packet)
        ihl = (vihl & 0xF) * 4
        offset, more = (frag & _OFFSET) * 8, bool(frag & _MF)
        payload = bytes(packet[ihl:total])
        key = (src, dst, proto, ident)
        d = self._dgrams.get(key)
        if offset == 0 and len(payload) < MIN_L4.get(proto, 0):
            self._fail(key, d, "frag_tiny")
        if more and (len(payload) % 8 or not payload):
            self._fail(key, d, "frag_malformed")
        if ihl + offset + len(payload) > MAX_DATAGRAM:
            self._fail(key, d, "frag_too_big")
        if d is None:
            if len(self._dgrams) >= self.max_datagrams:
                raise PacketError("frag_limit")
            d = self._dgrams[key] = _Datagram(now)
        if (self.held + len(payload) > self.max_bytes or len(d.pieces) >= self.max_pieces):
            self._fail(key, d, "frag_limit")
        if not self._fits(d, offset, payload, more):
            self._fail(key, d, "frag_overlap")
        if offset == 0:
            d.header = bytes(packet[:ihl])
        if not more:
            d.end = offset + len(payload)
        if offset not in d.pieces:
            d.pieces[offset] = payload
            d.held += len(payload)
            self.held += len(payload)
        elif len(payload) > len(d.pieces[offset]):  # agrees (checked) and reaches further
            self.held += len(payload) - len(d.pieces[offset])
            d.held += len(payload) - len(d.pieces[offset])
            d.pieces[offset] = payload
        return self._complete(key, d)

    @staticmethod
    def _fits(d: _Datagram, offset: int, payload: bytes, more: bool) -> bool:
        """Does the fragment agree with every byte already held, and with the
        datagram's end if one is known?"""
        stop = offset + len(payload)
        if d.end >= 0 and (stop > d.end or (not more and stop != d.end)):
            return False
        if not more and any(o + len(p) > stop for o, p in d.pieces.items()):
            return False
        for o, p in d.pieces.items():
            lo, hi = max(o, offset), min(o + len(p), stop)
            if lo < hi and p[lo - o:hi - o] != payload[lo - offset:hi - offset]:
                return False
        return True

    def _complete(self, key: tuple[bytes, bytes, int, int], d: _Datagram) -> bytes | None:
        if d.end < 0 or not d.header:
            return None
        reach = 0
        for o in sorted(d.pieces):
            if o > reach:
                return None
            reach = max(reach, o + len(d.pieces[o]))
        if reach < d.end:
            return None
        body = bytearray(d.end)
        for o, p in d.pieces.items():
            body[o:o + len(p)] = p
        self._forget(key, d)
        head = bytearray(d.header)
        struct.pack_into("!H", head, 2, len(head) + d.end)
        struct.pack_into("!H", head, 6, struct.unpack_from("!H", head, 6)[0] & _DF)
        head[10:12] = b"\x00\x00"
        struct.pack_into("!H", head, 10, checksum(head))
        return bytes(head + body)

    def _fail(self, key: tuple[bytes, bytes, int, int], d: _Datagram | None, reason: str) -> None:
        """Drop the datagram `d` (if any) with the fragment: `reason`."""
        if d is not None:
            self._forget(key, d)
        raise PacketError(reason)

    def _forget(self, key: tuple[bytes, bytes, int, int], d: _Datagram) -> None:
        del self._dgrams[key]
        self.held -= d.held


def fragment(packet: bytes, mtu: int) -> list[bytes]:
    """`packet` (IPv4) as fragments of at most `mtu` bytes (RFC 791), or
    unchanged when it fits or its DF bit forbids it. Later fragments carry
    the header without options (a reassembled datagram's options are the
    first fragment's; no option the dataplane forwards must be copied)."""
    if len(packet) <= mtu or packet[0] >> 4 != 4:
        return [packet]
    vihl, tos, total, ident, frag, ttl, proto, _ck, src, dst = struct.unpack_from(
        "!BBHHHBBH4s4s", packet)
    if frag & _DF:
        return [packet]
    ihl = (vihl & 0xF) * 4
    base, more_after = frag & _OFFSET, frag & _MF
    payload = packet[ihl:total]
    out = []
    pos, header = 0, packet[:ihl]
    while pos < len(payload):
        room = (mtu - len(header)) // 8 * 8
        piece = payload[pos:pos + room]
        last = pos + len(piece) >= len(payload)
        flags = (base + pos // 8) | (more_after if last else _MF)
        head = bytearray(header)
        struct.pack_into("!BBHHHBBH4s4s", head, 0, 0x40 | len(header) // 4, tos, len(header) + len(piece),
                         ident, flags, ttl, proto, 0, src, dst)
        struct.pack_into("!H", head, 10, checksum(head))
        out.append(bytes(head) + piece)
        pos += len(piece)
        header = header[:20]
    return out
