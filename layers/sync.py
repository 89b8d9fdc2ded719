"""Scapy layer for state-sync datagrams (see `dataplane/core/syncwire.py` for the
layout and the meaning of each record), so sync traffic can be crafted,
captured and decoded like the data path.

``AffinitySync(sender=..., receiver=..., records=[SyncRecord(type="ACK", value=...)])``
builds an unsigned datagram; ``signed(pkt, key)`` returns its bytes with the
HMAC tag a receiver will accept.
"""

from __future__ import annotations

from scapy.config import conf
from scapy.fields import (ByteEnumField, ByteField, FieldLenField, LongField, PacketListField,
                          StrFixedLenField, StrLenField, XIntField)
from scapy.layers.inet import UDP
from scapy.packet import Packet, bind_bottom_up, bind_layers

from dataplane.core import syncwire as sw

RECORD_TYPES = {int(t): t.name for t in sw.RecordType}


class SyncRecord(Packet):
    """One record of a sync datagram: type, length, value."""

    name = "SyncRecord"
    fields_desc = [
        ByteEnumField("type", sw.RecordType.HEARTBEAT, RECORD_TYPES),
        FieldLenField("length", None, length_of="value", fmt="!H"),
        StrLenField("value", b"", length_from=lambda p: p.length),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s

    def mysummary(self) -> str:
        return self.sprintf("%SyncRecord.type%(%SyncRecord.length%)")


class AffinitySync(Packet):
    """A state-sync datagram: 48-byte header, records, 16-byte HMAC tag."""

    name = "AffinitySync"
    fields_desc = [
        ByteField("version", sw.VERSION),
        ByteField("flags", 0),
        ByteField("key_id", 1),
        ByteField("reserved", 0),
        XIntField("sender", 0),
        XIntField("receiver", 0),
        LongField("incarnation", 0),
        LongField("receiver_incarnation", 0),
        LongField("counter", 0),
        LongField("seq", 0),
        FieldLenField("body_len", None, length_of="records", fmt="!H"),
        FieldLenField("count", None, count_of="records", fmt="!H"),
        PacketListField("records", [], SyncRecord, length_from=lambda p: p.body_len),
        StrFixedLenField("tag", b"\x00" * sw.TAG_LEN, sw.TAG_LEN),
    ]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args, **kargs):  # type: ignore[no-untyped-def]
        """Bytes too short for header and tag dissect as Raw, never raise."""
        if _pkt is not None and len(_pkt) < sw.HEADER_LEN + sw.TAG_LEN:
            return conf.raw_layer
        return cls

    def mysummary(self) -> str:
        kinds = ",".join(RECORD_TYPES.get(r.type, str(r.type)) for r in self.records)
        return self.sprintf(f"AffinitySync %AffinitySync.sender%>%AffinitySync.receiver% "
                            f"rinc=%AffinitySync.receiver_incarnation% "
                            f"seq=%AffinitySync.seq% ctr=%AffinitySync.counter% [{kinds}]")


def signed(pkt: AffinitySync, key: bytes) -> bytes:
    """The datagram's bytes with a valid HMAC-SHA-256-128 tag under `key`."""
    raw = bytes(pkt)[:-sw.TAG_LEN]
    return raw + sw.tag(key, raw)


bind_layers(UDP, AffinitySync, dport=sw.SYNC_PORT)
bind_bottom_up(UDP, AffinitySync, sport=sw.SYNC_PORT)
# control datagrams (same format) dissect too; building defaults to the sync port
bind_bottom_up(UDP, AffinitySync, dport=sw.CONTROL_PORT)
bind_bottom_up(UDP, AffinitySync, sport=sw.CONTROL_PORT)
