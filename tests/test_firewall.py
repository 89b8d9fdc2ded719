"""The stateful firewall: handshake, misdelivery, windows, close, pseudo-connections."""

from __future__ import annotations

from hypothesis import given, strategies as st
from scapy.layers.inet import ICMP, IP

from dataplane.core.packet import parse
from dataplane.core.services import Action
from dataplane.core.services.firewall import Firewall, FlowState, Kind, TcpState
from tests.conftest import tcp, udp

FW = Firewall(deny_ports=[23])


def step(st, data, forward=True):
    v, st = FW.process(parse(data), forward, st, 0.0)
    return v, st


def handshake():
    v, st = step(None, tcp(flags="S", seq=100))
    assert v.action == Action.FORWARD and v.mirror and st.state == TcpState.SYN_SENT
    v, st = step(st, tcp("10.2.0.10", "10.1.0.10", 80, 40000, "SA", seq=900, ack=101), forward=False)
    assert st.state == TcpState.SYN_RECV and v.mirror
    v, st = step(st, tcp(flags="A", seq=101, ack=901))
    assert st.state == TcpState.ESTABLISHED and v.mirror
    return st


def test_handshake_data_and_close():
    st = handshake()
    v, st = step(st, tcp(flags="PA", seq=101, ack=901, payload=b"x" * 500))
    assert v.action == Action.FORWARD and not v.mirror and st.end0 == 601
    v, st = step(st, tcp(flags="FA", seq=601, ack=901))
    assert st.state == TcpState.FIN_WAIT and v.mirror
    v, st = step(st, tcp("10.2.0.10", "10.1.0.10", 80, 40000, "FA", seq=901, ack=602), forward=False)
    assert st.state == TcpState.CLOSING
    v, st = step(st, tcp(flags="A", seq=602, ack=902))
    assert st.state == TcpState.TIME_WAIT and v.timeout == 10.0


def test_mid_stream_without_state_is_misdelivery():
    for flags in ("A", "PA", "FA", "SA", "R"):
        v, st = step(None, tcp(flags=flags, seq=5000, ack=77))
        assert v.action == Action.DROP and v.reason == "misdelivery" and st is None


def test_progress_is_mirrored_every_stride():
    st = handshake()
    mirrors = 0
    seq = 101
    for _ in range(300):
        v, st = step(st, tcp(flags="A", seq=seq, ack=901, payload=b"y" * 8000))
        seq += 8000
        mirrors += v.mirror
    assert mirrors == 300 * 8000 // (1 << 20)


def test_far_out_of_window_is_dropped():
    st = handshake()
    v, _ = step(st, tcp(flags="A", seq=(101 + (1 << 31)) % (1 << 32), ack=901))
    assert v.reason == "out_of_window"
    v, _ = step(st, tcp(flags="A", seq=101, ack=(901 + (1 << 31)) % (1 << 32)))
    assert v.reason == "ack_out_of_window"
    v, _ = step(st, tcp(flags="R", seq=(101 + (1 << 31)) % (1 << 32)))
    assert v.reason == "rst_out_of_window"


def test_rst_closes_and_a_new_syn_reopens():
    st = handshake()
    v, st = step(st, tcp(flags="R", seq=101))
    assert st.state == TcpState.CLOSED and v.mirror
    v, st = step(st, tcp(flags="S", seq=7777))
    assert st.state == TcpState.SYN_SENT and st.end0 == 7778


def test_bad_synack_and_deny_ports():
    _, st = step(None, tcp(flags="S", seq=100))
    v, _ = step(st, tcp("10.2.0.10", "10.1.0.10", 80, 40000, "SA", seq=900, ack=555), forward=False)
    assert v.reason == "ack_out_of_window"
    v, _ = step(None, tcp(dport=23))
    assert v.reason == "policy_denied"


def test_udp_and_icmp_pseudo_connections():
    v, st = step(None, udp())
    assert v.mirror and v.timeout == 30.0 and st.kind == Kind.UDP
    v, st = step(st, udp("10.2.0.10", "10.1.0.10", 53, 5000), forward=False)
    assert v.mirror and v.timeout == 120.0 and st.state == 1
    v, _ = step(None, udp("10.2.0.10", "10.1.0.10", 53, 5000), forward=False)
    assert v.reason == "misdelivery"
    v, st = step(None, bytes(IP(src="10.1.0.10", dst="10.2.0.10") / ICMP(type=8, id=3)))
    assert v.action == Action.FORWARD and st.kind == Kind.ICMP
    v, _ = step(None, bytes(IP(src="10.1.0.10", dst="10.2.0.10") / ICMP(type=0, id=3)))
    assert v.reason == "misdelivery"


@given(st.sampled_from(list(Kind)), st.integers(0, 7), st.booleans(), st.integers(0, 3),
       *[st.integers(0, 2**32 - 1)] * 4)
def test_state_round_trip(kind, state, orig, fin, e0, e1, s0, s1):
    s = FlowState(kind, state, orig, fin, e0, e1, s0, s1)
    assert FW.decode_state(FW.encode_state(s)) == s
