"""Pcap reading that tells a truncated or unreadable file apart from a good one.

Scapy's readers log a warning and stop early on a cut file; tools that compare
captures must instead say "this file is damaged". `read_frames` yields raw
frames (dissect them with Scapy when needed) and raises `PcapError` at the
first damaged record, after yielding everything before it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from scapy.error import Scapy_Exception
from scapy.utils import RawPcapReader


class PcapError(Exception):
    """The file is not a readable capture, or is damaged at some record."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame: its bytes, capture time and link type."""

    data: bytes
    time: float
    linktype: int


def read_frames(path: str) -> Iterator[Frame]:
    """Yield the frames of a pcap or pcapng file; raise PcapError if damaged."""
    try:
        reader = RawPcapReader(path)
    except (OSError, Scapy_Exception, EOFError, ValueError) as exc:
        raise PcapError(f"{path}: not a readable pcap/pcapng file ({exc})") from None
    count = 0
    try:
        size = os.fstat(reader.f.fileno()).st_size if hasattr(reader.f, "fileno") else None
        while True:
            try:
                data, meta = reader._read_packet()
            except EOFError:
                break
            except (Scapy_Exception, ValueError, OSError) as exc:
                raise PcapError(f"{path}: damaged record after {count} frames ({exc})") from None
            caplen = getattr(meta, "caplen", None)
            if caplen is not None and len(data) < caplen:
                raise PcapError(f"{path}: truncated record after {count} frames")
            count += 1
            linktype = meta.linktype if hasattr(meta, "linktype") else reader.linktype
            yield Frame(data, _timestamp(meta, reader), linktype)
        if size is not None and _is_classic(reader) and reader.f.tell() != size:
            raise PcapError(f"{path}: truncated record after {count} frames")
    finally:
        reader.close()


def _is_classic(reader: RawPcapReader) -> bool:
    return hasattr(reader, "endian") and not hasattr(reader, "interfaces")


def _timestamp(meta: object, reader: RawPcapReader) -> float:
    if hasattr(meta, "usec"):
        return meta.sec + meta.usec / (1e9 if getattr(reader, "nano", False) else 1e6)
    tshigh, tslow = getattr(meta, "tshigh", 0), getattr(meta, "tslow", 0)
    tsresol = getattr(meta, "tsresol", 1_000_000)
    return ((tshigh << 32) | tslow) / tsresol
