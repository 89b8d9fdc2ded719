"""The stateful firewall: handshake, misdelivery, windows, close, pseudo-connections."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from scapy.layers.inet import ICMP, IP

from dataplane.core.packet import parse
from dataplane.core.services import Action
from dataplane.core.services.firewall import MAX_WINDOW, Firewall, FlowState, Kind, TcpState
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
        assert v.action == Action.FORWARD
        seq += 8000
        mirrors += v.mirror
        v, st = step(st, tcp(*SERVER_SIDE, flags="A", seq=901, ack=seq), forward=False)  # the server acks
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


WORD = st.integers(0, 2**32 - 1)
TCP_STATES = st.builds(FlowState, st.just(Kind.TCP), st.integers(1, 7), st.booleans(), st.integers(0, 3),
                       *[WORD] * 10, st.integers(0, 14), st.integers(0, 14), st.integers(0, 31))
PSEUDO_STATES = st.builds(FlowState, st.sampled_from([Kind.UDP, Kind.ICMP, Kind.OTHER]), st.integers(0, 1),
                          st.booleans())


@given(st.one_of(TCP_STATES, PSEUDO_STATES))
def test_state_round_trip(s):
    s.maxwin0, s.maxwin1 = min(s.maxwin0, MAX_WINDOW), min(s.maxwin1, MAX_WINDOW)
    assert FW.decode_state(FW.encode_state(s)) == s


def test_the_state_of_older_releases_is_read_as_liberal():
    """20-byte states (no window) from an older peer still decode: liberal."""
    import struct
    old = struct.pack("!BBBB4I", Kind.TCP, TcpState.ESTABLISHED, 1, 0, 601, 901, 601, 901)
    s = FW.decode_state(old)
    assert s.flags & 1 and s.end0 == 601
    v, s = step(s, tcp(flags="PA", seq=601 + 100_000, ack=901, payload=b"x"))
    assert v.action == Action.FORWARD                  # no window known: liberal
    assert rst_closes(s, 601 + 100_001)[0] and not rst_closes(s, 601 + 5)[0]


@pytest.mark.parametrize("mangle,why", [
    (lambda b: b[:10], "bytes"), (lambda b: b"\x01" + b[1:], "version"),
    (lambda b: b[:1] + b"\x09" + b[2:], "kind"), (lambda b: b[:2] + b"\x09" + b[3:], "TCP state"),
    (lambda b: b[:3] + b"\x02" + b[4:], "direction"), (lambda b: b[:5] + b"\x80" + b[6:], "flags"),
    (lambda b: b[:6] + b"\x0f" + b[7:], "window"),
])
def test_decode_state_refuses_out_of_range_fields(mangle, why):
    good = FW.encode_state(handshake())
    FW.decode_state(good)
    with pytest.raises(ValueError, match=why):
        FW.decode_state(mangle(good))


# -- window tracking and blind RSTs (issue #14, finding 5) ---------------------------

import copy
import random

from scapy.layers.inet import TCP as ScapyTCP

SERVER_SIDE = ("10.2.0.10", "10.1.0.10", 80, 40000)


def rst_closes(st, seq, forward=True):
    """Does a RST with `seq` close the flow? (on a copy: the flow stays open)"""
    args = ((), dict(flags="R", seq=seq)) if forward else (SERVER_SIDE, dict(flags="R", seq=seq))
    v, after = step(copy.deepcopy(st), tcp(*args[0], **args[1]), forward)
    return after.state == TcpState.CLOSED, v


def test_random_sequence_rsts_do_not_close_an_established_flow():
    """1000 RSTs with random sequence numbers (a blind attacker's): none
    closes the flow (with the old +-2^30 window about half did)."""
    st = handshake()
    rng = random.Random(14)
    closed = [seq for seq in (rng.randrange(1 << 32) for _ in range(1000))
              if seq not in (101, 901) and rst_closes(st, seq, rng.random() < 0.5)[0]]
    assert closed == []


def test_exact_rst_closes_in_window_is_challenged_outside_is_dropped():
    st = handshake()
    closes, v = rst_closes(st, 101)                   # the server's rcv_nxt: exact
    assert closes and v.mirror
    closes, v = rst_closes(st, 901, forward=False)    # the client's rcv_nxt, from the server
    assert closes
    closes, v = rst_closes(st, 101 + 3000)            # in the window, not exact
    assert not closes and v.action == Action.DROP and v.reason == "rst_challenge"
    closes, v = rst_closes(st, 101 + 10_000_000)      # far outside the window
    assert not closes and v.reason == "rst_out_of_window"


def test_data_outside_the_tracked_window_is_dropped():
    """The server announced a window of 8192 bytes: data starting 100 kB
    ahead was accepted by the +-2^30 check; now it is out of window, and so
    is an acknowledgement of data the server never sent."""
    st = handshake()
    v, st = step(st, tcp(flags="PA", seq=101 + 100_000, ack=901, payload=b"x"))
    assert v.action == Action.DROP and v.reason == "out_of_window"
    v, st = step(st, tcp(flags="A", seq=101, ack=901 + 100_000))
    assert v.reason == "ack_out_of_window"
    v, st = step(st, tcp(flags="PA", seq=101 + 8000, ack=901, payload=b"y" * 100))   # in the window
    assert v.action == Action.FORWARD


def syn_with(window, wscale, **kw):
    opts = [("WScale", wscale)] if wscale is not None else []
    return bytes(IP(src="10.1.0.10", dst="10.2.0.10")
                 / ScapyTCP(sport=40000, dport=80, window=window, options=opts, **kw))


def synack_with(window, wscale, **kw):
    opts = [("WScale", wscale)] if wscale is not None else []
    return bytes(IP(src="10.2.0.10", dst="10.1.0.10")
                 / ScapyTCP(sport=80, dport=40000, window=window, options=opts, **kw))


@pytest.mark.parametrize("client_ws,server_ws,accepted", [(7, 7, True), (None, 7, False), (7, None, False)])
def test_window_scaling_from_the_syn_options(client_ws, server_ws, accepted):
    """Window scale counts only when both SYNs carry it (RFC 7323): a
    segment 1 MB ahead fits a window of 16384 << 7 but not of 16384."""
    _, st = step(None, syn_with(65535, client_ws, flags="S", seq=100))
    _, st = step(st, synack_with(65535, server_ws, flags="SA", seq=900, ack=101), forward=False)
    _, st = step(st, tcp(flags="A", seq=101, ack=901))
    v, st = step(st, bytes(IP(src="10.2.0.10", dst="10.1.0.10")
                           / ScapyTCP(sport=80, dport=40000, flags="A", seq=901, ack=101, window=16384)),
                 forward=False)
    assert v.action == Action.FORWARD
    v, _ = step(st, tcp(flags="PA", seq=101 + 1_000_000, ack=901, payload=b"z"))
    assert (v.action == Action.FORWARD) == accepted


def test_a_promoted_replica_checks_rsts_with_the_mirrored_window():
    """The window state is mirrored: a replica decoded from the primary's
    bytes (what the secondary holds after a failover) refuses a blind RST
    and accepts the exact one."""
    st = handshake()
    _, st = step(st, tcp(flags="PA", seq=101, ack=901, payload=b"x" * 500))
    v, st = step(st, tcp(*SERVER_SIDE, flags="A", seq=901, ack=601), forward=False)
    replica = FW.decode_state(FW.encode_state(st))
    closes, v = rst_closes(replica, 601 + 2000)
    assert not closes and v.reason == "rst_challenge"
    closes, v = rst_closes(replica, 601)
    assert closes


@given(st.binary(max_size=80))
def test_decode_state_of_random_bytes_raises_only_value_error(data):
    try:
        FW.decode_state(data)
    except ValueError:
        pass


@given(st.sampled_from([20, 48]).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
def test_decode_state_of_random_bytes_of_the_right_sizes(data):
    """A state that decodes is one the firewall can run: its next packets
    raise nothing (issue #14 finding 6: an unknown TCP state byte crashed the
    next packet)."""
    try:
        s = FW.decode_state(data)
    except ValueError:
        return
    for pkt, fwd in ((tcp(flags="A", seq=5, ack=7), True), (tcp(*SERVER_SIDE, flags="R", seq=9), False),
                     (udp(), True)):
        FW.process(parse(pkt), fwd, copy.deepcopy(s), 0.0)


def test_a_promoted_replica_catches_up_loosely_then_checks_strictly():
    """The mirror lags the stream: the promoted copy takes what the hosts
    sent through the old primary meanwhile (an ack of server data it never
    saw, a segment beyond its stale window), learns from it, and after
    LAG_TIME checks strictly again."""
    from dataplane.core.services.firewall import LAG_TIME

    st = FW.decode_state(FW.encode_state(handshake()))          # mirrored at ESTABLISHED
    def at(t, data, forward=True):
        return FW.process(parse(data), forward, st, t)
    v, _ = at(0.0, tcp(flags="PA", seq=101 + 200_000, ack=901 + 300_000, payload=b"x" * 1000))
    assert v.action == Action.FORWARD                             # unseen progress both ways
    v, _ = at(0.1, tcp(*SERVER_SIDE, flags="PA", seq=901 + 300_000, ack=101 + 201_000, payload=b"y" * 100),
              forward=False)
    assert v.action == Action.FORWARD
    assert st.lag_until == LAG_TIME
    # both directions seen, but server data sent through the old primary is
    # still arriving: the client acks bytes this copy never saw pass
    v, _ = at(0.2, tcp(flags="A", seq=101 + 201_000, ack=901 + 400_000))
    assert v.action == Action.FORWARD
    v, _ = at(LAG_TIME + 0.1, tcp(flags="A", seq=101 + 201_000, ack=901 + 400_000))
    assert v.action == Action.FORWARD and st.lag_until == 0.0      # strict from here on
    v, _ = at(LAG_TIME + 0.2, tcp(flags="PA", seq=101 + 201_000 + 10_000_000, ack=901 + 400_000, payload=b"z"))
    assert v.reason == "out_of_window"


def test_a_flow_that_comes_back_rerouted_catches_up_loosely():
    """This instance's own copy stopped at the handshake while the flow ran
    through another instance; it comes back REROUTED (`moved`): the next
    segment, far past the window held, passes. Control: without `moved`
    the same segment is out of window (the stall the comeback would be)."""
    ahead = tcp(flags="PA", seq=101 + 5_000_000, ack=901 + 3_000_000, payload=b"x" * 100)
    for came_back, action in ((True, Action.FORWARD), (False, Action.DROP)):
        st = handshake()
        if came_back:
            st = FW.moved(st)
        v, _ = FW.process(parse(ahead), True, st, 1.0)
        assert v.action == action
