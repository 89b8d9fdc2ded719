"""The stream affinity code: symmetric, keyed, stable, defined for every protocol."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.packet import Raw

from dataplane.core.affinity import AffinityHasher, flow_endpoints
from dataplane.core.packet import parse

H = AffinityHasher(b"test-secret")
V4 = st.ip_addresses(v=4).map(str)
V6 = st.ip_addresses(v=6).map(str)
PORTS = st.integers(0, 65535)


@given(st.one_of(st.tuples(V4, V4), st.tuples(V6, V6)), PORTS, PORTS, st.integers(0, 2**32 - 1),
       st.sampled_from([6, 17, 132]))
def test_symmetric(addrs, sport, dport, client, proto):
    a, b = addrs
    assert H.code_of(client, a, sport, b, dport, proto) == H.code_of(client, b, dport, a, sport, proto)


def test_every_field_counts():
    base = H.code_of(1, "10.0.0.1", 1000, "10.0.0.2", 80, 6)
    variants = [H.code_of(2, "10.0.0.1", 1000, "10.0.0.2", 80, 6),
                H.code_of(1, "10.0.0.3", 1000, "10.0.0.2", 80, 6),
                H.code_of(1, "10.0.0.1", 1001, "10.0.0.2", 80, 6),
                H.code_of(1, "10.0.0.1", 1000, "10.0.0.2", 81, 6),
                H.code_of(1, "10.0.0.1", 1000, "10.0.0.2", 80, 17)]
    assert base not in variants and len(set(variants)) == len(variants)


def test_keyed():
    other = AffinityHasher(b"another-secret")
    assert H.code_of(1, "10.0.0.1", 1, "10.0.0.2", 2, 6) != other.code_of(1, "10.0.0.1", 1, "10.0.0.2", 2, 6)
    with pytest.raises(ValueError):
        AffinityHasher(b"")
    with pytest.raises(ValueError):
        AffinityHasher(b"x" * 65)


def test_pinned_vector_is_stable_across_processes():
    """The exact function of the module docstring, pinned; and the same value
    in a fresh interpreter with another hash seed (never Python's hash())."""
    import hashlib
    import struct
    msg = struct.pack("!IBB", 7, 6, 4) + bytes([10, 0, 0, 1]) + struct.pack("!H", 1000) + \
        bytes([10, 0, 0, 2]) + struct.pack("!H", 80)
    expected = int.from_bytes(hashlib.blake2b(msg, key=b"test-secret", digest_size=4).digest(), "big")
    assert H.code_of(7, "10.0.0.2", 80, "10.0.0.1", 1000, 6) == expected
    code = "from dataplane.core.affinity import AffinityHasher as A; " \
           "print(A(b'test-secret').code_of(7, '10.0.0.1', 1000, '10.0.0.2', 80, 6))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}, check=True).stdout
    assert int(out) == expected


def test_code_from_packets_matches_both_directions():
    fwd = parse(bytes(IP(src="10.1.0.10", dst="10.2.0.10") / TCP(sport=40000, dport=80)))
    rev = parse(bytes(IP(src="10.2.0.10", dst="10.1.0.10") / TCP(sport=80, dport=40000, flags="SA")))
    assert H.code(3, fwd) == H.code(3, rev) == H.code_of(3, "10.1.0.10", 40000, "10.2.0.10", 80, 6)
    assert flow_endpoints(fwd)[:2] == flow_endpoints(rev)[:2]
    assert flow_endpoints(fwd)[2] != flow_endpoints(rev)[2]


def test_icmp_rules():
    req = parse(bytes(IP(src="10.1.0.10", dst="10.2.0.10") / ICMP(type=8, id=77)))
    rep = parse(bytes(IP(src="10.2.0.10", dst="10.1.0.10") / ICMP(type=0, id=77)))
    assert H.code(1, req) == H.code(1, rep) == H.code_of(1, "10.1.0.10", 77, "10.2.0.10", 77, 1)
    flow = IP(src="10.1.0.10", dst="10.2.0.10") / UDP(sport=5000, dport=53)
    err = parse(bytes(IP(src="10.9.0.1", dst="10.1.0.10") / ICMP(type=11) / IPerror(bytes(flow))))
    assert H.code(1, err) == H.code(1, parse(bytes(flow / Raw(b"x"))))


def test_fragments_hash_on_addresses():
    first = parse(bytes(IP(src="10.1.0.10", dst="10.2.0.10", flags="MF") / UDP(sport=1, dport=2)
                        / Raw(b"a" * 8)))
    later = parse(bytes(IP(src="10.1.0.10", dst="10.2.0.10", frag=2, proto=17) / Raw(b"b" * 8)))
    assert H.code(1, first) == H.code(1, later) == H.code_of(1, "10.1.0.10", 0, "10.2.0.10", 0, 17)
