"""The affinity header on raw bytes: constants, encode, strict decode.

The Scapy layer (`layers.affinity.Affinity`) is the reference definition for
people; this module is the same format for the per-packet path, which must not
build Scapy objects. Both import their numbers from here so they cannot drift.
See `layers/affinity.py` for the diagram and the reasons behind each size.
"""

from __future__ import annotations

import struct
from typing import NamedTuple
from enum import IntEnum, IntFlag

VERSION = 1
HEADER_LEN = 20
"""Fixed part of the header in bytes (5 words); options may follow."""
DEFAULT_TTL = 63
UDP_PORT = 6886
"""Default UDP destination port of the header on the fabric (configurable)."""
ETHERTYPE = 0x88B5
"""IEEE 802 local experimental EtherType, free for a custom L2 header."""
MAX_TTL = 255


class NextProto(IntEnum):
    """What follows the header (NSH's numbering, so tools agree)."""

    IPV4 = 1
    IPV6 = 2
    ETHERNET = 3


class Flags(IntFlag):
    """The 4 flag bits of word 0 (bit values as they sit in the nibble)."""

    OAM = 0x8
    """Operations and maintenance packet: never delivered to a host."""
    REROUTED = 0x4
    """Set by the upstream hop on the first packet it sends to a former secondary."""
    REVERSE = 0x2
    """Server-to-client direction: the chain is walked backwards."""


FLAG_NAMES = {"oam": Flags.OAM, "rerouted": Flags.REROUTED, "reverse": Flags.REVERSE}

_WORDS = struct.Struct("!BBBBIIII")


class HeaderError(ValueError):
    """A header that must be dropped; `reason` is the drop counter's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Header(NamedTuple):
    """The decoded fixed header. `length` is in bytes (options included).

    A NamedTuple, not a dataclass: it is built for every packet, and a frozen
    dataclass costs several times more to construct."""

    chain: int
    index: int
    code: int
    client: int
    epoch: int
    flags: int = 0
    ttl: int = DEFAULT_TTL
    next_proto: int = NextProto.IPV4
    version: int = VERSION
    length: int = HEADER_LEN

    def encode(self) -> bytes:
        """The 20-byte fixed header (length always written as 5 words)."""
        return pack(self.chain, self.index, self.code, self.client, self.epoch,
                    self.flags, self.ttl, self.next_proto)


def pack(chain: int, index: int, code: int, client: int, epoch: int,
         flags: int = 0, ttl: int = DEFAULT_TTL, next_proto: int = NextProto.IPV4,
         version: int = VERSION, words: int = HEADER_LEN // 4) -> bytes:
    """Encode the fixed header; `words` counts options the caller appends."""
    return _WORDS.pack((version << 4) | (flags & 0xF), ttl, words, next_proto,
                       (chain << 8) | index, code, client, epoch)


def decode(buf: bytes | memoryview, offset: int = 0) -> Header:
    """Decode and validate the header at `offset`; raise HeaderError(reason).

    Validation is what a receiving instance needs before trusting any field:
    the reasons double as drop-counter names.
    """
    if len(buf) - offset < HEADER_LEN:
        raise HeaderError("truncated", f"{len(buf) - offset} bytes < {HEADER_LEN}")
    b0, ttl, words, nxt, path, code, client, epoch = _WORDS.unpack_from(buf, offset)
    version = b0 >> 4
    if version != VERSION:
        raise HeaderError("bad_version", f"version {version}")
    length = words * 4
    if length < HEADER_LEN or length > len(buf) - offset:
        raise HeaderError("bad_length", f"length {words} words")
    if ttl == 0:
        raise HeaderError("ttl_expired")
    if nxt not in _NEXT_PROTOS:
        raise HeaderError("bad_next_proto", f"next protocol {nxt}")
    return Header(path >> 8, path & 0xFF, code, client, epoch, b0 & 0xF, ttl, nxt, version, length)


_NEXT_PROTOS = frozenset(int(p) for p in NextProto)


# -- options ---------------------------------------------------------------------------
#
# Options follow the 20-byte base, as TLVs: type (1 byte), value length in
# bytes (1 byte), value, zero padding to a 4-byte boundary. A reader skips the
# types it does not know. Type 0 is padding to the end.

OPT_GSO = 1
"""The host's virtio_net_hdr of a TCP super-frame (or a packet whose
checksum is left to the receiver), so the far edge can hand the frame to its
host as the kernel gave it: flags, gso_type (1 byte each), hdr_len,
gso_size, csum_start, csum_offset (2 bytes each, big endian)."""
_GSO = struct.Struct("!BBHHHH")


def pack_gso(flags: int, gso_type: int, hdr_len: int, gso_size: int, csum_start: int,
             csum_offset: int) -> bytes:
    """The GSO option (12 bytes, 3 words)."""
    return bytes([OPT_GSO, _GSO.size]) + _GSO.pack(flags, gso_type, hdr_len, gso_size, csum_start,
                                                   csum_offset)


def read_gso(options: bytes | memoryview) -> tuple[int, int, int, int, int, int] | None:
    """The GSO option's six fields from a header's options (the bytes after
    the 20-byte base), or None without one. Raises HeaderError("bad_option")
    on an option that runs past the end."""
    pos, end = 0, len(options)
    while pos < end:
        kind = options[pos]
        if kind == 0:
            return None
        if pos + 2 > end or pos + 2 + options[pos + 1] > end:
            raise HeaderError("bad_option", f"option {kind} runs past the header")
        size = options[pos + 1]
        if kind == OPT_GSO:
            if size != _GSO.size:
                raise HeaderError("bad_option", f"GSO option of {size} bytes")
            return _GSO.unpack_from(options, pos + 2)
        pos += (2 + size + 3) & ~3
    return None
