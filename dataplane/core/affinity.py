"""The stream affinity code: a keyed, symmetric hash of a flow's six-tuple.

Every packet of a stream, in both directions, must carry the same code, and
every process on every machine must compute the same value, so this is not
Python's `hash()` (salted per process). The exact function::

    ep(ip, port)  = ip_bytes (4 or 16) || port (2 bytes, big endian)
    lo, hi        = sorted([ep(src_ip, src_port), ep(dst_ip, dst_port)])
    message       = client_id (4, BE) || protocol (1) || family (1, 4 or 6) || lo || hi
    code          = int.from_bytes(BLAKE2b(message, key=mesh_secret, digest_size=4), "big")

Sorting the two endpoints makes the code symmetric. The key (the mesh secret,
up to 64 bytes) keeps outsiders from choosing flows that all land on one
instance: without it they could compute codes and aim at a bucket.

Which "ports" enter the hash (see `dataplane.core.packet.Inner`):

* TCP, UDP, SCTP, UDP-Lite: the real ports;
* ICMP / ICMPv6 echo request and reply: the echo identifier on both sides,
  so a ping and its replies form one stream;
* ICMP errors (unreachable, time exceeded, ...): the code of the flow quoted
  inside the error, so a "fragmentation needed" reaches the instances that
  hold the flow it is about;
* every other protocol: ports 0 (the stream is the address pair);
* fragments (IPv4 MF/offset, IPv6 fragment header): ports 0, since only
  the first carries ports. The edges never hash one: they reassemble IPv4
  datagrams first (`dataplane.core.defrag`), so a fragmented datagram gets
  its flow's code, and drop IPv6 fragments.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct

from dataplane.core.packet import Inner

_HEAD = struct.Struct("!IBB")
_PORT = struct.Struct("!H")
MAX_KEY = 64


class AffinityHasher:
    """Computes stream affinity codes under one mesh secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret or len(secret) > MAX_KEY:
            raise ValueError(f"mesh secret must be 1-{MAX_KEY} bytes, got {len(secret)}")
        self._base = hashlib.blake2b(digest_size=4, key=secret)

    def code(self, client: int, inner: Inner) -> int:
        """The code of the stream `inner` belongs to, for tenant `client`."""
        if inner.icmp_error is not None:
            inner = inner.icmp_error
        return self.code_of(client, inner.src, inner.sport, inner.dst, inner.dport,
                            inner.proto)

    def code_of(self, client: int, src: bytes | str, sport: int, dst: bytes | str,
                dport: int, proto: int) -> int:
        """The code of a six-tuple; addresses as packed bytes or text."""
        a = _ip_bytes(src) + _PORT.pack(sport)
        b = _ip_bytes(dst) + _PORT.pack(dport)
        if b < a:
            a, b = b, a
        h = self._base.copy()
        h.update(_HEAD.pack(client, proto, 4 if len(a) == 6 else 6))
        h.update(a)
        h.update(b)
        return int.from_bytes(h.digest(), "big")


def _ip_bytes(addr: bytes | str) -> bytes:
    if isinstance(addr, bytes):
        return addr
    return ipaddress.ip_address(addr).packed


def flow_endpoints(inner: Inner) -> tuple[tuple[bytes, int], tuple[bytes, int], bool]:
    """The canonical (lo, hi) endpoints of the packet's flow, and whether the
    packet travels lo -> hi. Flow tables key on this so that two flows with
    the same code (a hash collision) never share an entry."""
    a = (inner.src, inner.sport)
    b = (inner.dst, inner.dport)
    if b < a:
        return b, a, False
    return a, b, True
