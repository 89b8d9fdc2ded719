"""The Scapy layer of sync datagrams agrees with the protocol's own codec."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw

from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate
from layers.sync import AffinitySync, SyncRecord, signed

KEYS = sw.Keyring({3: b"s" * 32}, 3)
UPD = FlowUpdate((1, 5, 6, b"\x0a\x00\x00\x01", 1, b"\x0a\x00\x00\x02", 80), 7, b"state", False,
                 "egress", "aa", 30.0)


def test_codec_datagram_dissects():
    data = sw.encode(KEYS, sw.node_id("ba"), sw.node_id("bb"), 111, 222, 5, 42,
                     [sw.flow_record(UPD), sw.Record(sw.RecordType.ACK, sw.u64(9))])
    pkt = IP(bytes(IP() / UDP(sport=sw.SYNC_PORT, dport=sw.SYNC_PORT) / Raw(data)))
    s = pkt[AffinitySync]
    assert (s.version, s.sender, s.receiver, s.incarnation, s.receiver_incarnation, s.counter, s.seq,
            s.count, s.key_id) == (2, sw.node_id("ba"), sw.node_id("bb"), 111, 222, 5, 42, 2, 3)
    assert [r.type for r in s.records] == [sw.RecordType.FLOW_UPSERT, sw.RecordType.ACK]
    assert sw.read_flow(sw.Record(sw.RecordType.FLOW_UPSERT, s.records[0].value)) == UPD
    assert "FLOW_UPSERT,ACK" in s.mysummary()


def test_crafted_datagram_is_accepted_by_the_channel_codec():
    pkt = AffinitySync(key_id=3, sender=sw.node_id("ba"), receiver=sw.node_id("bb"), incarnation=5,
                       receiver_incarnation=6, counter=1,
                       records=[SyncRecord(type="HEARTBEAT", value=sw.u64(1))])
    dg = sw.decode(KEYS, signed(pkt, b"s" * 32), sw.node_id("bb"))
    assert dg.records[0].type == sw.RecordType.HEARTBEAT and (dg.incarnation, dg.receiver_incarnation) == (5, 6)
    assert (UDP() / pkt).dport == sw.SYNC_PORT


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_never_raises(data):
    AffinitySync(data)
    IP(bytes(IP() / UDP(dport=sw.SYNC_PORT) / Raw(data)))
