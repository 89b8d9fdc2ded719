"""Fuzzing every decoder that takes bytes from the network (bounded, in CI).

Each target gets random bytes, valid inputs cut short, and valid inputs
with bits flipped; sync and control datagrams also get bodies of random
records under a valid tag, so the record parsers behind the HMAC are
reached too. What may come out is fixed: a value, a documented error
(`HeaderError`, `PacketError`, `SyncError` with a reason from
`dataplane.core.reasons`), or, at the node entry points, events whose drops
carry documented reasons. Any other exception fails. The whole file runs
in well under 30 s (`max_examples` below); `HYPOTHESIS_PROFILE` is not
needed.
"""

from __future__ import annotations

import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.core import header as wire
from dataplane.core import syncwire as sw
from dataplane.core.affinity import AffinityHasher
from dataplane.core.control import ControlClient, Controller, Endpoint, map_record
from dataplane.core.events import Drop, Event, FlowUpdate
from dataplane.core.header import HeaderError
from dataplane.core.liveness import FailureDetector
from dataplane.core.node import EGRESS, INGRESS, EgressNode, IngressNode, ServiceNode
from dataplane.core.packet import TCP, PacketError, parse
from dataplane.core.reasons import DROP_REASONS, REFUSAL_REASONS
from dataplane.core.replicator import Policy, Replicator
from dataplane.core.services import create
from dataplane.core.syncchannel import Rejected, SyncChannel
from tests.conftest import codes_led_by, pair_map, tcp, udp

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CHEAP = settings(FUZZ, max_examples=1000)
"""For the pure decoders, microseconds an example: many more of them."""
KEYS = sw.Keyring({1: b"f" * 32}, 1)
MAP = pair_map()
CODE = codes_led_by(MAP, "ba")[0]
INNER = [tcp(flags="S"), tcp(flags="PA", payload=b"GET / HTTP/1.1\r\n"), udp(payload=b"q" * 30),
         bytes.fromhex("6000000000140640" + "20010db8" + "00" * 11 + "01" + "20010db8" + "00" * 11 + "02")
         + tcp(flags="S")[20:]]
HEADED = [wire.pack(1, 1, CODE, 1, MAP.epoch) + p for p in INNER] + \
    [wire.pack(1, 0, CODE, 1, MAP.epoch, int(wire.Flags.REVERSE), words=8) + wire.pack_gso(1, 4, 66, 1448, 34, 16)
     + INNER[0]]


def _flip(data: bytes, bits: list[int]) -> bytes:
    out = bytearray(data)
    for b in bits:
        if out:
            pos = b % (len(out) * 8)
            out[pos // 8] ^= 1 << (pos % 8)
    return bytes(out)


def _poke(data: bytes, pos: int, value: int) -> bytes:
    if not data:
        return data
    pos %= len(data)
    return data[:pos] + bytes([value]) + data[pos + 1:]


def damaged(samples: list[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, a sample cut short, a sample with bits flipped, or
    with one byte (a length, an offset, a type) set to any value."""
    base = st.sampled_from(samples)
    return st.one_of(
        st.binary(max_size=300),
        st.tuples(base, st.integers(0, 1 << 16)).map(lambda t: t[0][:t[1] % (len(t[0]) + 1)]),
        st.tuples(base, st.lists(st.integers(0, 1 << 20), min_size=1, max_size=6)).map(lambda t: _flip(*t)),
        st.tuples(base, st.integers(0, 1 << 16), st.integers(0, 255)).map(lambda t: _poke(*t)),
    )


def _drops_documented(events: list[Event]) -> None:
    for ev in events:
        if isinstance(ev, Drop):
            assert ev.reason in DROP_REASONS, ev.reason


# -- the affinity header and the inner packet -------------------------------------------------


@CHEAP
@given(damaged(HEADED))
def test_header_decode(data):
    try:
        h = wire.decode(data)
    except HeaderError as exc:
        assert exc.reason in DROP_REASONS
        return
    assert h.version == wire.VERSION and wire.HEADER_LEN <= h.length <= len(data) and h.ttl > 0
    try:
        wire.read_gso(data[wire.HEADER_LEN:h.length])
    except HeaderError as exc:
        assert exc.reason == "bad_option"


def check_inner(data: bytes) -> None:
    """`parse` refuses with a documented reason, or everything it read lies
    inside the packet its own headers delimit."""
    try:
        p = parse(data)
    except PacketError as exc:
        assert exc.reason in DROP_REASONS
        return
    assert p.family == data[0] >> 4
    assert p.length <= len(data) and p.l4 <= p.length
    if p.family == 4:
        total, frag = struct.unpack_from("!H", data, 2)[0], struct.unpack_from("!H", data, 6)[0]
        assert p.length == total and p.l4 == (data[0] & 0xF) * 4 and p.fragment == bool(frag & 0x3FFF)
    else:
        assert p.length == 40 + struct.unpack_from("!H", data, 4)[0]
    if p.proto == TCP and not p.fragment:
        hl = (data[p.l4 + 12] >> 4) * 4
        assert 20 <= hl and p.l4 + hl <= p.length
        assert len(p.payload) == p.length - p.l4 - hl


@CHEAP
@given(damaged(INNER))
def test_inner_packet_parse(data):
    check_inner(data)


# -- the node entry points ----------------------------------------------------------------------


def _nodes():
    hasher = AffinityHasher(b"fuzz")
    nodes = {"ingress": IngressNode(INGRESS, MAP, hasher), "egress": EgressNode(EGRESS, MAP)}
    for kind in ("firewall", "inspection", "passthrough"):
        nodes[kind] = ServiceNode("ba", MAP, create(kind))
    nodes["nat"] = ServiceNode("ba", MAP, create("nat", pool=["198.51.100.7"], ports=[20000, 20999]))
    for n in nodes.values():  # flows to hit, so the paths that find state are fuzzed too
        for data in HEADED[:3]:
            if isinstance(n, ServiceNode):
                n.from_fabric(data, "ingress", 0.0)
                n.from_fabric(data, "ingress", 0.0)
        if isinstance(n, IngressNode):
            for p in INNER:
                n.from_client(p, 0.0)
        if isinstance(n, EgressNode):
            for data in HEADED[:3]:
                n.from_fabric(bytes([data[0] | 0]) + data[1:], "ba", 0.0)
    return nodes


NODES = _nodes()


@FUZZ
@given(damaged(INNER))
def test_node_from_client_and_from_server(data):
    _drops_documented(NODES["ingress"].from_client(data, 1.0))
    _drops_documented(NODES["egress"].from_server(data, 1.0))


@FUZZ
@given(damaged(HEADED), st.sampled_from(["ingress", "egress", "firewall", "inspection", "passthrough", "nat"]),
       st.sampled_from(["ingress", "egress", "bb", None]))
def test_node_from_fabric(data, node, src):
    _drops_documented(NODES[node].from_fabric(data, src, 1.0))


@FUZZ
@given(st.sampled_from(HEADED[:1]), st.binary(max_size=80))
def test_node_from_fabric_valid_header_random_inner(head, inner):
    for name in ("firewall", "inspection", "passthrough", "nat", "egress"):
        _drops_documented(NODES[name].from_fabric(head[:20] + bytes([0x45]) + inner, "ingress", 1.0))


# -- sync datagrams ---------------------------------------------------------------------------

BA, BB = sw.node_id("ba"), sw.node_id("bb")
KEY4 = (1, CODE, 6, bytes([10, 1, 0, 10]), 40000, bytes([10, 2, 0, 10]), 80)
RECORDS = [sw.hello(1), sw.Record(sw.RecordType.HEARTBEAT, sw.u64(5)), sw.Record(sw.RecordType.ACK, sw.u64(3)),
           sw.ranges(sw.RecordType.NACK, [(1, 2)]),
           sw.flow_record(FlowUpdate(KEY4, 2, create("firewall").encode_state(
               create("firewall").process(parse(tcp(flags="S")), True, None, 0.0)[1]), False, "egress", "ingress")),
           sw.flow_record(FlowUpdate(KEY4, 3, deleted=True)), sw.bulk(sw.RecordType.BULK_BEGIN, 1, 1, 1),
           sw.bulk(sw.RecordType.BULK_END, 1, 1, 1), sw.Record(sw.RecordType.RESYNC, b"")]
DATAGRAMS = [sw.encode(KEYS, BA, BB, 1000, 2000, n, 1, [r]) for n, r in enumerate(RECORDS, 1)] + \
    [sw.encode(KEYS, BA, BB, 1000, 2000, 99, 1, RECORDS)]


def signed(body: bytes, count: int, counter: int = 7) -> bytes:
    """A datagram ba -> bb with a valid tag around `body` (any bytes)."""
    head = struct.pack("!BBBBIIQQQQHH", sw.VERSION, 0, 1, 0, BA, BB, 1000, 2000, counter, 1,
                       len(body), count)
    return head + body + sw.tag(KEYS.keys[1], head + body)


def records(rtypes: list[int], values: list[bytes]) -> bytes:
    return b"".join(struct.pack("!BH", t, len(v)) + v for t, v in zip(rtypes, values))


SIGNED = st.builds(lambda ts, vs, extra: signed(records(ts, vs) + extra, len(ts)),
                   st.lists(st.integers(0, 13), max_size=5), st.lists(st.binary(max_size=60), min_size=5, max_size=5),
                   st.sampled_from([b"", b"\x00", b"\x06\x00\x30"]))
RECORD_VALUES = st.one_of(st.binary(max_size=120), damaged([r.value for r in RECORDS]))


@FUZZ
@given(st.one_of(damaged(DATAGRAMS), SIGNED))
def test_sync_datagram_decode(data):
    try:
        dg = sw.decode(KEYS, data, BB)
    except sw.SyncError as exc:
        assert exc.reason in REFUSAL_REASONS
        return
    assert dg.receiver == BB


@CHEAP
@given(st.sampled_from(list(sw.RecordType)), RECORD_VALUES)
def test_sync_record_readers(rtype, value):
    rec = sw.Record(rtype, value)
    readers = {sw.RecordType.HELLO: sw.read_hello, sw.RecordType.NACK: sw.read_ranges,
               sw.RecordType.BULK_BEGIN: sw.read_bulk, sw.RecordType.BULK_END: sw.read_bulk,
               sw.RecordType.FLOW_UPSERT: lambda v: sw.read_flow(rec),
               sw.RecordType.FLOW_DELETE: lambda v: sw.read_flow(rec),
               sw.RecordType.ACK: sw.read_u64, sw.RecordType.HEARTBEAT: sw.read_u64}
    if rtype not in readers:
        return
    try:
        readers[rtype](value)
    except sw.SyncError as exc:
        assert exc.reason == "malformed"


def test_every_prefix_and_byte_of_each_record():
    """Exhaustive where random draws are thin: every prefix of every valid
    record value, and every byte of it set to 0, 1, 0x80 and 0xFF."""
    readers = {sw.RecordType.HELLO: sw.read_hello, sw.RecordType.NACK: sw.read_ranges,
               sw.RecordType.BULK_BEGIN: sw.read_bulk, sw.RecordType.BULK_END: sw.read_bulk,
               sw.RecordType.ACK: sw.read_u64, sw.RecordType.HEARTBEAT: sw.read_u64}
    for rec in RECORDS:
        read = readers.get(rec.type, lambda v, t=rec.type: sw.read_flow(sw.Record(t, v)))
        variants = [rec.value[:n] for n in range(len(rec.value))]
        variants += [_poke(rec.value, i, b) for i in range(len(rec.value)) for b in (0, 1, 0x80, 0xFF)]
        for v in variants:
            try:
                read(v)
            except sw.SyncError as exc:
                assert exc.reason == "malformed"


def _channel() -> SyncChannel:
    ch = SyncChannel("bb", "ba", KEYS, 2000)
    for data in DATAGRAMS[:1]:
        ch.receive(data, 0.0)
    return ch


@FUZZ
@given(st.lists(st.one_of(damaged(DATAGRAMS), SIGNED, st.sampled_from(DATAGRAMS)), min_size=1, max_size=4))
def test_sync_channel_receive(datagrams):
    ch = _channel()
    for i, data in enumerate(datagrams):
        for ev in ch.receive(data, 0.01 * (i + 1)):
            if isinstance(ev, Rejected):
                assert ev.reason in REFUSAL_REASONS, ev.reason
        ch.tick(0.01 * (i + 1))


@FUZZ
@given(st.lists(st.one_of(damaged(DATAGRAMS), SIGNED, st.sampled_from(DATAGRAMS)), min_size=1, max_size=4),
       st.sampled_from(["firewall", "inspection", "nat"]))
def test_replicator_receive(datagrams, kind):
    options = {"pool": ["198.51.100.7"], "ports": [20000, 20999]} if kind == "nat" else {}
    rep = Replicator(ServiceNode("bb", MAP, create(kind, **options)), KEYS, 2000, Policy.ASYNC)
    for i, data in enumerate(datagrams):
        rep.receive(data, 0.01 * (i + 1))
        rep.tick(0.01 * (i + 1))
    _drops_documented([Drop(r) for r in rep.node.drops])


# -- control datagrams ------------------------------------------------------------------------

CTL_KEYS = sw.Keyring({1: b"c" * 32}, 1)
MAP_JSON = MAP.to_json().encode()
MAP_VALUES = st.one_of(
    st.binary(max_size=200),
    damaged([map_record(MAP).value]),
    damaged([MAP_JSON]).map(zlib.compress),
    st.sampled_from([zlib.compress(b"[" * 5000 + b"]" * 5000), zlib.compress(b" " * (2 << 20)),
                     zlib.compress(b'{"epoch": 99}'), zlib.compress(b"null")]),
)


@FUZZ
@given(st.lists(MAP_VALUES, min_size=1, max_size=3), damaged([b""]))
def test_control_client_receive(values, junk):
    """A forwarder takes MAP records only from the controller: signed ones
    with any content, and unsigned junk; refused or counted, never raised."""
    client = ControlClient("ba", "ctl", MAP, CTL_KEYS, 100)
    ctl = Endpoint("ctl", ["ba"], CTL_KEYS, 7000)
    ctl.incarnations["ba"] = 100
    for v in values:
        client.receive(ctl.encode("ba", [sw.Record(sw.RecordType.MAP, v)]))
    client.receive(junk)
    assert all(r in REFUSAL_REASONS for r in client.endpoint.rejected)


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b"\x00" * 5, b"\xff" * 5])),
                min_size=1, max_size=3),
       st.lists(st.integers(0, 13), min_size=1, max_size=3), damaged([b"\x00" * 80]))
def test_controller_receive(values, rtypes, junk):
    ctl = Controller("ctl", pair_map(), CTL_KEYS, 7000, FailureDetector(0.005, 4, 1.0))
    fwd = Endpoint("ba", ["ctl"], CTL_KEYS, 100)
    recs = [sw.Record(sw.RecordType(t) if t in iter(sw.RecordType) else sw.RecordType.STATUS, v)
            for t, v in zip(rtypes, values)]
    ctl.receive(fwd.encode("ctl", [sw.Record(sw.RecordType.HEARTBEAT, sw.u64(1))] + recs), 0.0)
    ctl.receive(junk, 0.1)
    assert all(r in REFUSAL_REASONS for r in ctl.endpoint.rejected)
