"""IPv4 reassembly at the edges (dataplane/core/defrag.py): order, overlaps,
limits, timeout and bounded memory; re-fragmentation for delivery."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment as scapy_fragment
from scapy.packet import Raw

from dataplane.core.defrag import Defrag, fragment
from dataplane.core.packet import PacketError, parse


def datagram(size: int = 3000, ident: int = 7, src: str = "10.1.0.10") -> IP:
    body = bytes(random.Random(ident).randrange(256) for _ in range(size))
    return IP(src=src, dst="10.2.0.10", id=ident) / UDP(sport=5000, dport=9000) / Raw(body)


def frags(pkt: IP, size: int = 1000) -> list[bytes]:
    return [bytes(f) for f in scapy_fragment(pkt, fragsize=size)]


def push_all(d: Defrag, pieces: list[bytes], now: float = 0.0) -> list[bytes | None]:
    return [d.push(p, now) for p in pieces]


def test_in_order_reassembles_the_original_datagram():
    pkt = datagram()
    d = Defrag(Counter())
    out = push_all(d, frags(pkt))
    assert out[:-1] == [None] * (len(out) - 1)
    assert out[-1] == bytes(IP(bytes(pkt)))  # header checksum recomputed, flags clear
    assert len(d) == 0 and d.held == 0
    p = parse(out[-1])
    assert (p.proto, p.sport, p.dport, p.fragment) == (17, 5000, 9000, False)


def test_reverse_and_shuffled_orders_reassemble():
    pkt = datagram(5000)
    pieces = frags(pkt, 800)
    for order in (pieces[::-1], random.Random(1).sample(pieces, len(pieces))):
        d = Defrag(Counter())
        out = push_all(d, order)
        assert out[-1] == bytes(IP(bytes(pkt))) and all(o is None for o in out[:-1])


def test_duplicate_and_agreeing_overlap_are_accepted():
    pkt = datagram(2000)
    raw = bytes(pkt)
    first, second = frags(pkt, 1000)[:2]
    # an agreeing overlap: bytes 992..1800 of the payload, the same as the original
    overlap = bytes(IP(src="10.1.0.10", dst="10.2.0.10", id=7, proto=17, flags="MF", frag=124)
                    / Raw(raw[20 + 992:20 + 1800]))
    d = Defrag(Counter())
    assert d.push(first, 0) is None
    assert d.push(first, 0) is None
    assert d.push(overlap, 0) is None
    rest = frags(pkt, 1000)[1:]
    out = push_all(d, rest)
    assert out[-1] == bytes(IP(raw))
    assert second in rest


def test_disagreeing_overlap_drops_the_datagram():
    pkt = datagram(2000)
    pieces = frags(pkt, 1000)
    forged = bytearray(pieces[1])
    forged[-1] ^= 0xFF
    d = Defrag(Counter())
    assert d.push(pieces[1], 0) is None
    with pytest.raises(PacketError) as exc:
        d.push(bytes(forged), 0)
    assert exc.value.reason == "frag_overlap"
    assert len(d) == 0 and d.held == 0
    # what remains starts a new datagram: it never completes with the dropped piece
    assert d.push(pieces[0], 0) is None


def test_two_different_ends_disagree():
    pkt = datagram(2000)
    pieces = frags(pkt, 1000)
    d = Defrag(Counter())
    assert d.push(pieces[-1], 0) is None
    short = bytes(IP(src="10.1.0.10", dst="10.2.0.10", id=7, proto=17, frag=125) / Raw(b"x" * 8))
    with pytest.raises(PacketError) as exc:
        d.push(short, 0)
    assert exc.value.reason == "frag_overlap"


def test_tiny_first_fragment_is_dropped():
    syn = IP(src="10.1.0.10", dst="10.2.0.10", id=9, flags="MF") / Raw(bytes(TCP(dport=23, flags="S"))[:8])
    syn.proto = 6
    with pytest.raises(PacketError) as exc:
        Defrag(Counter()).push(bytes(syn), 0)
    assert exc.value.reason == "frag_tiny"


def test_fragment_not_a_multiple_of_8_is_malformed():
    bad = IP(src="10.1.0.10", dst="10.2.0.10", id=9, proto=17, flags="MF", frag=10) / Raw(b"x" * 13)
    with pytest.raises(PacketError) as exc:
        Defrag(Counter()).push(bytes(bad), 0)
    assert exc.value.reason == "frag_malformed"


def test_past_65535_bytes_is_too_big():
    last = IP(src="10.1.0.10", dst="10.2.0.10", id=9, proto=17, frag=8189) / Raw(b"x" * 40)
    with pytest.raises(PacketError) as exc:
        Defrag(Counter()).push(bytes(last), 0)
    assert exc.value.reason == "frag_too_big"


def test_incomplete_datagram_times_out_and_is_counted_once():
    drops: Counter[str] = Counter()
    d = Defrag(drops, timeout=2.0)
    pieces = frags(datagram())
    d.push(pieces[0], 0.0)
    d.push(pieces[1], 1.0)
    assert len(d) == 1
    d.expire(1.99)
    assert len(d) == 1 and drops["frag_timeout"] == 0
    assert d.push(pieces[2], 2.0) is None  # arrives too late: starts a datagram of its own
    assert drops["frag_timeout"] == 1 and len(d) == 1 and d.held == len(pieces[2]) - 20


def test_flood_of_first_fragments_stays_bounded_and_real_datagram_waits_out_the_timeout():
    drops: Counter[str] = Counter()
    d = Defrag(drops, max_datagrams=100, max_bytes=64 << 10)
    first = bytearray(frags(datagram(1500), 1000)[0])
    refused = 0
    for i in range(20_000):
        first[4:6] = (i % 65536).to_bytes(2, "big")  # a new IP id (and source) per datagram
        first[13:16] = i.to_bytes(3, "big")
        try:
            assert d.push(bytes(first), i * 1e-5) is None
        except PacketError as exc:
            assert exc.reason == "frag_limit"
            refused += 1
        assert len(d) <= 100 and d.held <= 64 << 10
    held = len(d)
    assert refused == 20_000 - held and 50 < held <= 100
    pieces = frags(datagram())
    with pytest.raises(PacketError):
        d.push(pieces[0], 1.0)
    out = push_all(d, pieces, now=3.0)  # the flood timed out: room again
    assert out[-1] is not None and drops["frag_timeout"] == held


def test_byte_limit_drops_the_datagram_that_passes_it():
    d = Defrag(Counter(), max_bytes=2500)
    pieces = frags(datagram(4000), 1000)
    d.push(pieces[0], 0)
    d.push(pieces[1], 0)
    with pytest.raises(PacketError) as exc:
        d.push(pieces[2], 0)
    assert exc.value.reason == "frag_limit"
    assert len(d) == 0 and d.held == 0


def test_fragment_for_delivery_round_trips_and_keeps_df():
    pkt = bytes(IP(bytes(datagram(4000))))
    pieces = fragment(pkt, 1500)
    assert len(pieces) == 3 and all(len(p) <= 1500 for p in pieces)
    for p in pieces:
        assert IP(p).chksum == IP(bytes(IP(p))).chksum  # valid header checksums
    d = Defrag(Counter())
    assert push_all(d, pieces[::-1])[-1] == pkt
    df = bytes(IP(src="10.1.0.10", dst="10.2.0.10", flags="DF") / UDP() / Raw(b"x" * 3000))
    assert fragment(df, 1500) == [df]
    assert fragment(pkt, 65535) == [pkt]


def test_random_fragments_only_ever_raise_counted_reasons_and_keep_the_books():
    rng = random.Random(14)
    base = bytes(IP(src="10.1.0.10", dst="10.2.0.10", proto=17))
    d = Defrag(Counter(), max_datagrams=8, max_bytes=1 << 14, max_pieces=16)
    reasons: Counter[str] = Counter()
    for i in range(5000):
        head = bytearray(base)
        head[4:6] = rng.randrange(4).to_bytes(2, "big")
        frag = rng.randrange(0, 8192) if rng.random() < 0.2 else rng.randrange(0, 64)
        flags = 0x2000 if rng.random() < 0.7 else 0
        body = bytes([rng.randrange(2)]) * rng.choice([0, 3, 8, 16, 24, 800])
        head[6:8] = (flags | frag).to_bytes(2, "big")
        head[2:4] = (20 + len(body)).to_bytes(2, "big")
        try:
            d.push(bytes(head) + body, i * 0.01)
        except PacketError as exc:
            reasons[exc.reason] += 1
        assert d.held == sum(len(p) for g in d._dgrams.values() for p in g.pieces.values())
        assert len(d) <= 8 and d.held <= 1 << 14
    assert set(reasons) <= {"frag_tiny", "frag_malformed", "frag_too_big", "frag_overlap", "frag_limit"}
    assert reasons["frag_overlap"] and reasons["frag_malformed"]
