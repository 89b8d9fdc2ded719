"""The Scapy layer: byte-exact vectors, bindings, bad headers, robustness."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from dataplane.core import header as wire
from layers.affinity import Affinity, set_udp_port

H = dict(chain=0x123456, index=3, code=0xDEADBEEF, client=42, epoch=7)
BARE = "103f050112345603deadbeef0000002a00000007"
UDP_V4_TCP = ("4500005800010000401166920a0000010a00000213881ae60044a7cf" + BARE +
              "4500002800010000400674ca010101010202020204d2005000000000000000005002200084bb0000")
ETHER_V6_UDP = ("02000000000202000000000188b5" + "103f0502" + BARE[8:] +
                "600000000008114020010db800000000000000000000000120010db8"
                "000000000000000000000002000100020008a466")
OAM_ETHER = ("183f0503" + BARE[8:] + "0200000000040200000000030800")


def test_bare_header_vector():
    assert bytes(Affinity(**H)).hex() == BARE


def test_udp_binding_sets_port_and_next_proto():
    pkt = (IP(src="10.0.0.1", dst="10.0.0.2", id=1) / UDP(sport=5000) / Affinity(**H)
           / IP(src="1.1.1.1", dst="2.2.2.2", id=1) / TCP(sport=1234, dport=80))
    assert bytes(pkt).hex() == UDP_V4_TCP
    assert pkt[UDP].dport == wire.UDP_PORT
    assert pkt[Affinity].next_proto == wire.NextProto.IPV4


def test_udp_dissect_finds_every_layer():
    pkt = IP(bytes.fromhex(UDP_V4_TCP))
    hdr = pkt[Affinity]
    assert (hdr.chain, hdr.index, hdr.code, hdr.client, hdr.epoch) == (0x123456, 3, 0xDEADBEEF, 42, 7)
    assert hdr.length == 5 and hdr.ttl == 63 and hdr.version == 1
    assert pkt[TCP].dport == 80 and pkt[Affinity][IP].src == "1.1.1.1"


def test_udp_source_port_also_dissects():
    raw = bytes(IP() / UDP(sport=wire.UDP_PORT, dport=9) / Affinity(**H) / IP())
    assert Affinity in IP(raw)


def test_ethertype_binding_with_ipv6():
    pkt = (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / Affinity(**H)
           / IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1, dport=2))
    assert bytes(pkt).hex() == ETHER_V6_UDP
    back = Ether(bytes.fromhex(ETHER_V6_UDP))
    assert back.type == wire.ETHERTYPE
    assert back[Affinity].next_proto == wire.NextProto.IPV6
    assert back[IPv6].dst == "2001:db8::2" and back[UDP].dport == 2


def test_ethernet_next_proto_and_flags():
    pkt = Affinity(flags="oam", **H) / Ether(src="02:00:00:00:00:03", dst="02:00:00:00:00:04",
                                             type=0x0800)
    assert bytes(pkt).hex() == OAM_ETHER
    back = Affinity(bytes.fromhex(OAM_ETHER))
    assert back.flags.oam and not back.flags.rerouted
    assert isinstance(back.payload, Ether) and back[Ether].dst == "02:00:00:00:00:04"


def test_flag_bits_agree_with_raw_codec():
    for name, bit in wire.FLAG_NAMES.items():
        raw = bytes(Affinity(flags=name))
        assert wire.decode(raw).flags == bit


def test_options_are_padded_and_counted():
    raw = bytes(Affinity(options=b"\x01\x02\x03", **H))
    assert raw.hex() == "103f0601" + BARE[8:] + "01020300"
    assert Affinity(raw).options == b"\x01\x02\x03\x00"


def test_explicit_bad_length_and_version_are_kept():
    raw = bytes(Affinity(length=2, version=7, **H) / IP())
    assert raw[0] >> 4 == 7 and raw[2] == 2
    with pytest.raises(wire.HeaderError) as err:
        wire.decode(raw)
    assert err.value.reason == "bad_version"
    raw = bytes(Affinity(length=200, **H) / IP())
    assert raw[2] == 200
    with pytest.raises(wire.HeaderError) as err:
        wire.decode(raw)
    assert err.value.reason == "bad_length"


def test_summary_shows_the_routing_fields():
    s = Affinity(**H).mysummary()
    for part in ("chain=1193046", "si=3", "code=0xdeadbeef", "client=42", "epoch=7"):
        assert part in s


def test_truncated_header_dissects_as_raw():
    assert isinstance(Affinity(bytes.fromhex(BARE)[:7]), Raw)
    pkt = IP(bytes.fromhex(UDP_V4_TCP)[:35])
    assert Affinity not in pkt and Raw in pkt


def test_set_udp_port_moves_the_binding():
    try:
        set_udp_port(7000)
        assert (UDP() / Affinity()).dport == 7000
        assert Affinity in IP(bytes(IP() / UDP(sport=1, dport=7000) / Affinity() / IP()))
        assert Affinity not in IP(bytes(IP() / UDP(sport=1, dport=wire.UDP_PORT) / Raw(b"x" * 40)))
    finally:
        set_udp_port(wire.UDP_PORT)
    with pytest.raises(ValueError):
        set_udp_port(70000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_never_raises(data):
    Affinity(data)
    IP(bytes(IP() / UDP(dport=wire.UDP_PORT) / Raw(data)))
    Ether(bytes(Ether(type=wire.ETHERTYPE))[:14] + data)


@settings(max_examples=300, deadline=None)
@given(chain=st.integers(0, 2**24 - 1), index=st.integers(0, 255), code=st.integers(0, 2**32 - 1),
       client=st.integers(0, 2**32 - 1), epoch=st.integers(0, 2**32 - 1), flags=st.integers(0, 15),
       ttl=st.integers(1, 255), nxt=st.sampled_from(list(wire.NextProto)))
def test_scapy_and_raw_codec_agree(chain, index, code, client, epoch, flags, ttl, nxt):
    raw = bytes(Affinity(chain=chain, index=index, code=code, client=client, epoch=epoch,
                         flags=flags, ttl=ttl, next_proto=nxt))
    assert raw == wire.pack(chain, index, code, client, epoch, flags, ttl, nxt)
    h = wire.decode(raw)
    assert (h.chain, h.index, h.code, h.client, h.epoch, h.flags, h.ttl, h.next_proto) == \
        (chain, index, code, client, epoch, flags, ttl, nxt)
