"""Known-answer vectors: the functions every process of a mesh must compute
alike, and the bytes every process must put on the wire, pinned.

A round trip cannot catch a change made on both sides (another hash, a
reordered field, a different byte order): two builds that differ would each
pass their own round trips and still not understand each other. These
vectors were computed once from the definitions in the modules' docstrings
and must never change; a change of format is a new version, with new
vectors beside these. A different but valid hash (BLAKE2s, another digest
size, another domain string, unsorted endpoints) fails them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct

import pytest

from dataplane.core import header as wire
from dataplane.core import rendezvous as rv
from dataplane.core import syncwire as sw
from dataplane.core.affinity import AffinityHasher
from dataplane.core.events import FlowUpdate
from dataplane.core.servicemap import ServiceMap

SECRET = b"affinity-mesh known answers"

AFFINITY = [
    # (client, src, sport, dst, dport, proto) -> code
    ((1, "10.1.0.10", 40000, "10.2.0.10", 80, 6), 0x7CEF1253),
    ((7, "10.1.0.10", 5000, "10.2.0.10", 53, 17), 0xDC7347F3),
    ((1, "2001:db8::1", 443, "2001:db8::2", 51000, 6), 0x65A02C0C),
    ((0xFFFFFFFF, "192.0.2.1", 0x1234, "198.51.100.9", 0x1234, 1), 0xB492FD89),
    ((3, "10.9.8.7", 0, "10.9.8.6", 0, 47), 0x9ECD985D),
]


@pytest.mark.parametrize("six,code", AFFINITY)
def test_affinity_code_known_answers(six, code):
    h = AffinityHasher(SECRET)
    client, src, sport, dst, dport, proto = six
    assert h.code_of(*six) == code
    assert h.code_of(client, dst, dport, src, sport, proto) == code  # symmetric


def test_affinity_code_is_the_documented_function():
    """The docstring's definition, written out with hashlib, gives the vector."""
    a = ipaddress.ip_address("10.1.0.10").packed + struct.pack("!H", 40000)
    b = ipaddress.ip_address("10.2.0.10").packed + struct.pack("!H", 80)
    msg = struct.pack("!IBB", 1, 6, 4) + min(a, b) + max(a, b)
    spec = int.from_bytes(hashlib.blake2b(msg, key=SECRET, digest_size=4).digest(), "big")
    assert spec == AFFINITY[0][1]


def test_rendezvous_weights_and_ranks_known_answers():
    assert list(rv.weights("B", "ba", 4)) == [0x7F46C7D0, 0xD7AACC57, 0x851F893F, 0x733D5C9C]
    ranks = rv.rank("B", ["ba", "bb", "bc", "bd"], 16, 3)
    assert [list(r) for r in ranks] == [
        [2, 0, 2, 3, 0, 3, 0, 2, 1, 3, 3, 1, 1, 3, 1, 0],
        [1, 1, 3, 1, 1, 2, 2, 1, 3, 0, 0, 2, 3, 1, 2, 2],
        [0, 3, 0, 0, 3, 0, 3, 3, 2, 2, 2, 0, 2, 2, 0, 3],
    ]


def test_spread_ranks_known_answers():
    """Hosts declared: ba, bb on h1; bc, bd on h2 (bd dead); be on h3,
    joining. Indexes are into the eligible members [ba, bb, bc, be]: be
    never leads, no pair shares a host."""
    ranks = rv.rank_spread("B", ["ba", "bb", "bc", "bd", "be"], ["h1", "h1", "h2", "h2", "h3"],
                           [True, True, True, False, True], 16, 2, frozenset({4}))
    assert [list(r) for r in ranks] == [
        [2, 0, 2, 1, 0, 0, 0, 2, 1, 0, 0, 1, 1, 1, 1, 0],
        [1, 3, 3, 3, 3, 3, 3, 1, 3, 3, 3, 3, 3, 3, 3, 3],
    ]


def test_service_map_roles_known_answers():
    """A code's bucket (code % buckets) and its primary and secondary."""
    m = ServiceMap(buckets=16)
    m.add_service("B", ["ba", "bb", "bc", "bd"])
    roles = [(m.primary("B", c), m.secondary("B", c)) for c in (0x7CEF1253, 0xB492FD89, 0x65A02C0C)]
    assert roles == [("bd", "bb"), ("bd", "ba"), ("bb", "bd")]  # buckets 3, 9, 12 of the ranks above


def test_header_known_answer():
    data = wire.pack(1, 2, 0xDEADBEEF, 7, 42, int(wire.Flags.REROUTED | wire.Flags.REVERSE), 61,
                     wire.NextProto.IPV6, words=8)
    assert data.hex() == "163d080200000102deadbeef000000070000002a"
    assert wire.decode(data + bytes(12)) == wire.Header(1, 2, 0xDEADBEEF, 7, 42, 0x6, 61, 2, 1, 32)
    assert wire.pack_gso(1, 4, 66, 1448, 34, 16).hex() == "010a0104004205a800220010"


K4 = (1, 0x7CEF1253, 6, bytes([10, 1, 0, 10]), 40000, bytes([10, 2, 0, 10]), 80)
K6 = (2, 0x65A02C0C, 17, ipaddress.ip_address("2001:db8::1").packed, 443,
      ipaddress.ip_address("2001:db8::2").packed, 51000)
RT = sw.RecordType
RECORDS = [
    (sw.hello(7, True), "000000000000000701"),
    (sw.Record(RT.HEARTBEAT, sw.u64(1_700_000_000_123_456)), "00060a2418202240"),
    (sw.Record(RT.ACK, sw.u64(5)), "0000000000000005"),
    (sw.ranges(RT.NACK, [(6, 7), (9, 9)]),
     "0000000000000006000000000000000700000000000000090000000000000009"),
    (sw.flow_record(FlowUpdate(K4, 3, b"\x01\x02\x03", False, "egress", "ingress", 7200.0)),
     "000000017cef125306040a01000a9c400a02000a00500000000000000003006ddd00"
     "0665677265737307696e67726573730003010203"),
    (sw.flow_record(FlowUpdate(K6, 1, b"", False, None, "aa", 30.5)),
     "0000000265a02c0c110620010db800000000000000000000000101bb20010db8000000"
     "000000000000000002c738000000000000000100007724000261610000"),
    (sw.flow_record(FlowUpdate(K4, 4, deleted=True)),
     "000000017cef125306040a01000a9c400a02000a00500000000000000004"),
    (sw.bulk(RT.BULK_BEGIN, 9, 1000, 12), "0000000900000000000003e80000000c"),
    (sw.bulk(RT.BULK_END, 9, 1000, 12), "0000000900000000000003e80000000c"),
    (sw.Record(RT.RESYNC, b""), ""),
    (sw.Record(RT.STATUS, (12).to_bytes(4, "big") + bytes([2])), "0000000c02"),
]
DATAGRAM = (
    "0200030028418838dfab1baa00060a24181e400100060a24181e4002000000000000004d"
    "00000000000003e80113000b01000900000000000000070102000800060a241820224003"
    "000800000000000000050400200000000000000006000000000000000700000000000000"
    "090000000000000009060036000000017cef125306040a01000a9c400a02000a00500000"
    "000000000003006ddd000665677265737307696e677265737300030102030600400000"
    "000265a02c0c110620010db800000000000000000000000101bb20010db80000000000"
    "00000000000002c73800000000000000010000772400026161000007001e000000017c"
    "ef125306040a01000a9c400a02000a005000000000000000040800100000000900000000"
    "000003e80000000c0900100000000900000000000003e80000000c0a00000c00050000"
    "000c0278f22ef2fa00792175e7a5599f6a884c"
)


def test_node_ids_and_pair_key_known_answers():
    assert (sw.node_id("ba"), sw.node_id("controller")) == (0x28418838, 0xC351BA00)
    assert sw.pair_key(b"k" * 32, 1, 2).hex() == \
        "ece0c675d7a0d470eb2a2d990648767d80f865ce2c9ea8d8336338ee6083dd6f"
    assert sw.pair_key(b"k" * 32, 2, 1) == sw.pair_key(b"k" * 32, 1, 2)


@pytest.mark.parametrize("record,value", RECORDS, ids=[r.type.name + str(i) for i, (r, _) in enumerate(RECORDS)])
def test_sync_record_known_answers(record, value):
    assert record.value.hex() == value


def test_sync_flow_records_read_back_from_the_pinned_bytes():
    for record, value in RECORDS[4:7]:
        assert sw.read_flow(sw.Record(record.type, bytes.fromhex(value))) == sw.read_flow(record)
    assert sw.read_flow(sw.Record(RT.FLOW_UPSERT, bytes.fromhex(RECORDS[4][1]))) == \
        FlowUpdate(K4, 3, b"\x01\x02\x03", False, "egress", "ingress", 7.2 * 1000)


def test_sync_datagram_known_answer():
    ring = sw.Keyring({3: b"affinity-mesh known-answer key!!"}, 3)
    ba, bb = sw.node_id("ba"), sw.node_id("bb")
    data = sw.encode(ring, ba, bb, 1_700_000_000_000_001, 1_700_000_000_000_002, 77, 1000,
                     [r for r, _ in RECORDS])
    assert data.hex() == DATAGRAM
    dg = sw.decode(ring, bytes.fromhex(DATAGRAM), bb)
    assert (dg.key_id, dg.sender, dg.receiver, dg.incarnation, dg.receiver_incarnation, dg.counter,
            dg.seq) == (3, ba, bb, 1_700_000_000_000_001, 1_700_000_000_000_002, 77, 1000)
    assert [(r.type, r.value.hex()) for r in dg.records] == [(r.type, v) for r, v in RECORDS]
