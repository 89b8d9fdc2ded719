"""The struct-only inner packet parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.packet import Raw

from dataplane.core.packet import TCP_ACK, TCP_PSH, PacketError, checksum, parse, transport_checksum_ok
from dataplane.core.reasons import DROP_REASONS


def test_tcp_fields():
    p = parse(bytes(IP(src="1.2.3.4", dst="5.6.7.8") / TCP(sport=1, dport=2, seq=7, ack=9,
                                                          flags="PA", window=77) / Raw(b"hey")))
    assert (p.family, p.proto, p.sport, p.dport, p.seq, p.ack, p.window) == (4, 6, 1, 2, 7, 9, 77)
    assert p.tcp_flags == TCP_PSH | TCP_ACK and bytes(p.payload) == b"hey"
    assert p.src == bytes([1, 2, 3, 4])


def test_udp_and_ipv6():
    p = parse(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=5, dport=6) / Raw(b"x")))
    assert (p.family, p.proto, p.sport, p.dport, bytes(p.payload)) == (6, 17, 5, 6, b"x")


def test_icmp_echo_uses_id_on_both_sides():
    p = parse(bytes(IP() / ICMP(type=8, id=4242)))
    assert p.sport == p.dport == 4242
    p6 = parse(bytes(IPv6() / ICMPv6EchoRequest(id=99)))
    assert p6.sport == p6.dport == 99


def test_icmp_error_carries_the_quoted_flow():
    quoted = IP(src="10.2.0.10", dst="10.1.0.10") / TCP(sport=80, dport=40000)
    p = parse(bytes(IP(src="10.9.9.9", dst="10.1.0.10") / ICMP(type=3, code=4)
                    / IPerror(bytes(quoted)[:28])))
    assert p.icmp_error is not None
    assert (p.icmp_error.sport, p.icmp_error.dport, p.icmp_error.proto) == (80, 40000, 6)


def test_fragments_have_no_ports():
    p = parse(bytes(IP(flags="MF", frag=0) / UDP(sport=1, dport=2) / Raw(b"a" * 16)))
    assert p.fragment and (p.sport, p.dport) == (0, 0)
    p = parse(bytes(IP(frag=3, proto=17) / Raw(b"b" * 16)))
    assert p.fragment and (p.sport, p.dport) == (0, 0)
    p6 = parse(bytes(IPv6() / IPv6ExtHdrFragment(m=1) / UDP(sport=1, dport=2)))
    assert p6.fragment and p6.proto == 17 and p6.sport == 0


@pytest.mark.parametrize("data,reason", [
    (b"", "inner_truncated"),
    (b"\x45" + b"\x00" * 10, "inner_truncated"),
    (b"\x75" + b"\x00" * 30, "inner_not_ip"),
    (bytes(IP() / TCP())[:30], "inner_truncated"),
    (bytes(IP(ihl=3) / UDP()), "inner_bad_ip_header"),
    (bytes(IP() / TCP(dataofs=2)), "inner_bad_tcp_header"),
])
def test_refusals(data, reason):
    with pytest.raises(PacketError) as err:
        parse(data)
    assert err.value.reason == reason


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([b"\x45", b"\x60", b"\x46"]))
def test_garbage_raises_only_packet_error(data, first):
    """Refused with a documented reason, or what was read lies inside the
    packet (tests/test_fuzz.py checks every field of an accepted one)."""
    try:
        p = parse(first + data)
    except PacketError as exc:
        assert exc.reason in DROP_REASONS
        return
    assert p.l4 <= p.length <= len(first + data)


@pytest.mark.parametrize("ip", [IP(src="10.1.0.1", dst="10.2.0.2"),
                                IPv6(src="2001:db8::1", dst="2001:db8::2")])
def test_tcp_reset_has_valid_checksums(ip):
    from dataplane.core.packet import tcp_reset
    cls = type(ip)
    raw = tcp_reset(parse(bytes(ip / TCP(sport=1234, dport=23, flags="S", seq=99))))
    pkt = cls(raw)
    fresh = pkt.copy()
    del fresh[TCP].chksum
    if cls is IP:
        del fresh.chksum
    again = cls(bytes(fresh))                 # Scapy recomputes both checksums
    assert again[TCP].chksum == pkt[TCP].chksum
    assert cls is not IP or again.chksum == pkt.chksum
    assert pkt[TCP].flags == "RA" and pkt[TCP].ack == 100 and pkt[TCP].sport == 23


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_transport_checksum_is_verified_over_the_pseudo_header(family, proto):
    """What the receiving host checks: right, wrong, odd length, UDP's 0 (none),
    and a checksum left to offload (not checkable)."""
    ip = IP(src="10.1.0.10", dst="10.2.0.10") if family == 4 else IPv6(src="fd00::1", dst="fd00::2")
    l4 = TCP(sport=1, dport=2, flags="PA") if proto == "tcp" else UDP(sport=1, dport=2)
    for payload in (b"even", b"odd"):
        good = ip / l4 / Raw(payload)
        assert transport_checksum_ok(parse(bytes(good)))
        right = good.__class__(bytes(good))[l4.__class__].chksum
        bad = good.copy()
        bad[l4.__class__].chksum = right ^ 0x0101
        p = parse(bytes(bad))
        assert not transport_checksum_ok(p)
        p.csum_partial = True
        assert transport_checksum_ok(p)
    if proto == "udp":
        none = ip / UDP(sport=1, dport=2, chksum=0) / Raw(b"x")
        assert transport_checksum_ok(parse(bytes(none)))


def test_ipv6_extension_header_past_the_end_is_truncated():
    """Found by tests/test_fuzz.py: a hop-by-hop header whose length runs
    past the payload was accepted, with the transport header beyond the packet."""
    hbh = bytes([0, 0]) + bytes(6) + bytes([2, 1]) + bytes(6)   # 8 bytes, then one claiming 16
    data = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=0, plen=len(hbh)))[:40] + hbh
    with pytest.raises(PacketError) as err:
        parse(data)
    assert err.value.reason == "inner_truncated"


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x00", b"\xff\xff", b"\xff", b"\x12\x34\x56",
                                  bytes(range(255)), bytes(range(256)) * 5 + b"\x07"])
def test_checksum_is_rfc_1071_for_odd_lengths_and_all_ones(data):
    """Against Scapy's checksum: an odd length is padded with a zero byte,
    and a one's complement sum of all ones is 0xFFFF, not 0."""
    from scapy.utils import checksum as scapy_checksum

    assert checksum(data) == scapy_checksum(data)
