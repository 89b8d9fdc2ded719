"""Scapy layer for the affinity header that rides every packet of the mesh.

The classifier adds it on entry; every service instance reads it to find the
stream's chain position and owner, and the egress strips it. It is modelled on
NSH (RFC 8300) so it reads familiar, but it carries what failover needs in a
fixed 20-byte base that can be parsed with one ``struct.unpack``::

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-------+-------+---------------+---------------+---------------+
    |Version|O|R|V|x|      TTL      |    Length     |  Next Proto   |
    +-------+-------+---------------+---------------+---------------+
    |          Service Chain ID (24)                | Service Index |
    +-----------------------------------------------+---------------+
    |                   Stream Affinity Code (32)                   |
    +---------------------------------------------------------------+
    |                   Client (tenant) ID (32)                     |
    +---------------------------------------------------------------+
    |                   Service Map Epoch (32)                      |
    +---------------------------------------------------------------+
    |              Options (Length * 4 - 20 bytes, optional)        |
    +---------------------------------------------------------------+

Why these sizes:

* **Version, 4 bits** (this is version 1; 0 is refused so zeroed memory is
  never a valid header). Sixteen versions is plenty for a fabric-internal format.
* **Flags, 4 bits**: O = OAM (never delivered to a host), R = rerouted (set on
  the first packet a hop sends to a former secondary, so captures show the
  failover), V = reverse direction (server to client: the chain is walked
  backwards), x = reserved, must be zero.
* **TTL, 8 bits**, default 63 as NSH: a loop guard, decremented per hop.
* **Length, 8 bits, in 4-byte words** (as NSH), header plus options: up to
  1020 bytes, so later versions can add options that old readers skip.
* **Next protocol, 8 bits**, NSH's numbers: 1 IPv4, 2 IPv6, 3 Ethernet.
* **Service chain id 24 bits + service index 8 bits**: NSH's SPI/SI. 16M
  chains covers every tenant having many chains; the index counts down the
  chain (255 services is far beyond any real chain).
* **Stream affinity code, 32 bits**: the keyed symmetric flow hash. 32 bits
  indexes bucket tables of any practical size (2^16 by default) and keeps
  collisions rare; collisions are harmless because flow tables key on the
  full 5-tuple too.
* **Client id, 32 bits**: the tenant, as the patent family's NSH metadata.
* **Map epoch, 32 bits**: the service-map version the sender routed with, so
  a receiver can tell a packet routed on an older map (it is still served);
  at one change per millisecond it wraps after 49 days, and epochs are only
  compared for equality or "newer", with serial-number arithmetic.

Options (after the 20-byte base, within Length): TLVs of type (1 byte),
value length in bytes (1 byte), value, zero padding to 4 bytes; a reader
skips types it does not know, type 0 pads to the end. Type 1 (GSO, 10
bytes: flags, gso_type, then hdr_len, gso_size, csum_start, csum_offset as
16-bit big-endian) carries a host's virtio_net_hdr from edge to edge when the
lab carries TCP super-frames (`dataplane.core.header.pack_gso`).

Bindings: UDP destination (or source) port 6886 by default (change it with
``set_udp_port``), EtherType 0x88B5 (IEEE local experimental), and above the
header IPv4 / IPv6 / Ethernet by next protocol. An explicit wrong ``length``
or ``version`` is kept when built so malformed packets can be crafted.
"""

from __future__ import annotations

from scapy.config import conf
from scapy.fields import (BitField, ByteEnumField, ByteField, FlagsField,
                          IntField, StrLenField, ThreeBytesField, XIntField)
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, bind_bottom_up, bind_layers, split_layers

from dataplane.core import header as wire

NEXT_PROTO_NAMES = {int(p): p.name for p in wire.NextProto}
FLAG_BITS = ["reserved", "reverse", "rerouted", "oam"]
"""FlagsField names, least significant bit first (x, V, R, O in the diagram)."""


class Affinity(Packet):
    """The affinity header (see the module docstring for the layout)."""

    name = "Affinity"
    fields_desc = [
        BitField("version", wire.VERSION, 4),
        FlagsField("flags", 0, 4, FLAG_BITS),
        ByteField("ttl", wire.DEFAULT_TTL),
        ByteField("length", None),
        ByteEnumField("next_proto", wire.NextProto.IPV4, NEXT_PROTO_NAMES),
        ThreeBytesField("chain", 0),
        ByteField("index", 1),
        XIntField("code", 0),
        IntField("client", 0),
        IntField("epoch", 0),
        StrLenField("options", b"",
                    length_from=lambda p: max(0, (p.length or 0) * 4 - wire.HEADER_LEN)),
    ]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args, **kargs):  # type: ignore[no-untyped-def]
        """Bytes too short for the fixed header dissect as Raw, never raise."""
        if _pkt is not None and len(_pkt) < wire.HEADER_LEN:
            return conf.raw_layer
        return cls

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.length is None:
            pkt += b"\x00" * (-len(pkt) % 4)
            pkt = pkt[:2] + bytes([min(len(pkt) // 4, 255)]) + pkt[3:]
        return pkt + pay

    def mysummary(self) -> str:
        return self.sprintf("Affinity chain=%Affinity.chain% si=%Affinity.index% "
                            "code=%Affinity.code% client=%Affinity.client% "
                            "epoch=%Affinity.epoch%")


_udp_port = wire.UDP_PORT


def set_udp_port(port: int) -> None:
    """Move the UDP binding to `port` (build and dissect), e.g. for a lab that
    runs the fabric on another port."""
    global _udp_port
    if not 0 < port < 65536:
        raise ValueError(f"UDP port {port} out of range 1-65535")
    split_layers(UDP, Affinity, dport=_udp_port)
    split_layers(UDP, Affinity, sport=_udp_port)
    _bind_udp(port)
    _udp_port = port


def _bind_udp(port: int) -> None:
    bind_layers(UDP, Affinity, dport=port)
    bind_bottom_up(UDP, Affinity, sport=port)


_bind_udp(_udp_port)
bind_layers(Ether, Affinity, type=wire.ETHERTYPE)
bind_layers(Affinity, IP, next_proto=wire.NextProto.IPV4)
bind_layers(Affinity, IPv6, next_proto=wire.NextProto.IPV6)
bind_layers(Affinity, Ether, next_proto=wire.NextProto.ETHERNET)
