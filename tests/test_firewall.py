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


# -- RSTs before the handshake, exact RSTs, ICMP errors without a flow, comebacks ----

from dataplane.core.services import Verdict  # noqa: E402
from dataplane.core.services.firewall import LAG_TIME, TCP_TIMEOUTS  # noqa: E402

CLOSED = Verdict(Action.FORWARD, mirror=True, timeout=TCP_TIMEOUTS[TcpState.CLOSED])


def syn_sent():
    _, st = step(None, tcp(flags="S", seq=100))
    assert st.state == TcpState.SYN_SENT and st.end0 == 101
    return st


@pytest.mark.parametrize("rst,forward,closes", [
    (tcp(*SERVER_SIDE, flags="RA", seq=0, ack=101), False, True),     # the refusal of the SYN
    (tcp(*SERVER_SIDE, flags="RA", seq=0, ack=100), False, False),    # acknowledges something else
    (tcp(*SERVER_SIDE, flags="R", seq=0, ack=101), False, False),     # no ACK flag: acknowledges nothing
    (tcp(*SERVER_SIDE, flags="RA", seq=101, ack=7), False, False),    # its seq counts for nothing
    (tcp(flags="R", seq=101), True, True),                            # the originator's own abort
    (tcp(flags="R", seq=100), True, False),
], ids=["refusal", "other-ack", "no-ack-flag", "seq-not-ack", "own-abort", "own-abort-bad-seq"])
def test_a_rst_before_the_handshake_closes_only_when_it_answers_the_syn(rst, forward, closes):
    v, st = step(syn_sent(), rst, forward)
    if closes:
        assert v == CLOSED and st.state == TcpState.CLOSED
    else:
        assert v == Verdict(Action.DROP, "rst_out_of_window") and st.state == TcpState.SYN_SENT


def test_an_exact_rst_closes_with_the_closed_timeout():
    closes, v = rst_closes(handshake(), 101)
    assert closes and v == CLOSED


def test_a_rst_at_the_receivers_last_ack_or_behind_the_senders_unacknowledged_data_closes():
    """Each side has sent data the other has not acknowledged yet: a RST
    is exact at the receiver's last ack, or right behind the sender's own
    data, from either side."""
    st = handshake()
    _, st = step(st, tcp(flags="PA", seq=101, ack=901, payload=b"c" * 500))             # end0 = 601
    _, st = step(st, tcp(*SERVER_SIDE, flags="PA", seq=901, ack=101, payload=b"s" * 100),
                 forward=False)                                                          # end1 = 1001
    assert (st.end0, st.maxack1, st.end1, st.maxack0) == (601, 101, 1001, 901)
    for seq, forward in ((601, True), (101, True), (1001, False), (901, False)):
        closes, v = rst_closes(st, seq, forward)
        assert closes, (seq, forward)
    for seq, forward in ((301, True), (951, False)):
        closes, v = rst_closes(st, seq, forward)
        assert not closes and v.reason == "rst_challenge"


def test_a_rst_is_checked_against_its_own_directions_window():
    """A client RST 8,000 bytes behind its own next byte is inside the
    client's window (the server announced 8,192) though outside the
    server's: challenged, not refused as out of window."""
    closes, v = rst_closes(handshake(), (101 - 8000) % (1 << 32))
    assert not closes and v.reason == "rst_challenge"


def test_a_state_of_older_releases_knows_no_acks_so_a_rst_at_sequence_0_is_not_exact():
    import struct
    old = FW.decode_state(struct.pack("!BBBB4I", Kind.TCP, TcpState.ESTABLISHED, 1, 0, 601, 901, 601, 901))
    assert old.maxack0 == old.maxack1 == 0
    for forward in (True, False):
        closes, v = rst_closes(old, 0, forward)
        assert not closes and v.action == Action.DROP


def test_an_icmp_error_quoting_no_flow_here_is_dropped():
    query = udp(sport=5000, dport=53)
    err = parse(bytes(IP(src="10.2.0.10", dst="10.1.0.10") / ICMP(type=3, code=3) / IP(query)))
    assert err.icmp_error is not None
    assert FW.process(err, False, None, 0.0) == (Verdict(Action.DROP, "icmp_unrelated"), None)


def test_a_flow_that_came_back_starts_its_catch_up_clock_at_its_first_packet():
    st = FW.moved(handshake())
    v, st = step_at(st, tcp(*SERVER_SIDE, flags="PA", seq=901 + 50_000, ack=101, payload=b"s"), 10.0, False)
    assert v.action == Action.FORWARD and st.lag_until == 10.0 + LAG_TIME


def test_a_flow_that_came_back_stays_loose_until_both_directions_passed():
    """Only the server talks for longer than LAG_TIME: the client's side
    was not seen since the comeback, so its unseen progress still passes."""
    st = FW.moved(handshake())
    for t in (0.0, LAG_TIME + 1.0):
        v, st = step_at(st, tcp(*SERVER_SIDE, flags="A", seq=901, ack=101), t, False)
        assert v.action == Action.FORWARD
    assert st.lag_until
    v, st = step_at(st, tcp(flags="PA", seq=101 + 5_000_000, ack=901, payload=b"c"), LAG_TIME + 1.1)
    assert v.action == Action.FORWARD


def step_at(st, data, now, forward=True):
    return FW.process(parse(data), forward, st, now)


def test_an_icmp_echo_request_is_known_by_its_type_byte_alone():
    """A first fragment of one byte (the type: echo request) opens an ICMP
    pseudo-connection like a whole echo request; an empty one does not."""
    frag = parse(bytes(IP(src="10.1.0.10", dst="10.2.0.10", proto=1, flags="MF") / b"\x08"))
    assert frag.fragment
    v, st = FW.process(frag, True, None, 0.0)
    assert v.action == Action.FORWARD and st.kind == Kind.ICMP
    empty = parse(bytes(IP(src="10.1.0.10", dst="10.2.0.10", proto=1, flags="MF")))
    assert FW.process(empty, True, None, 0.0) == (Verdict(Action.DROP, "misdelivery"), None)


def test_a_reply_without_a_flow_is_a_dropped_misdelivery():
    v, st = step(None, udp("10.2.0.10", "10.1.0.10", 53, 5000), forward=False)
    assert v == Verdict(Action.DROP, "misdelivery") and st is None


def liberal(end0, end1):
    """A state of an older release: no window known, checked +-2^30."""
    import struct
    return FW.decode_state(struct.pack("!BBBB4I", Kind.TCP, TcpState.ESTABLISHED, 1, 0, end0, end1, end0, end1))


def test_a_liberal_state_takes_segments_less_than_2_to_the_30_either_side():
    for end0 in (601, (1 << 30) + 100, (1 << 32) - 50):
        for delta, passes in ((-((1 << 30) - 1), True), (-10, True), ((1 << 30) - 1, True),
                              (1 << 30, False), (-(1 << 30), False)):
            seq = (end0 + delta) % (1 << 32)
            v, _ = step(liberal(end0, 901), tcp(flags="PA", seq=seq, ack=901, payload=b"x"))
            assert (v.action == Action.FORWARD) == passes, (end0, delta)
            if not passes:
                assert v.reason == "out_of_window"


# -- the mirrored state: every field checked at its bounds, errors that say why -------

import struct  # noqa: E402

V2 = struct.Struct("!BBBBBBBB10I")
FIELDS = ("version", "kind", "state", "orig", "fin", "flags", "scale0", "scale1", "end0", "end1", "maxend0",
          "maxend1", "maxwin0", "maxwin1", "maxack0", "maxack1", "synced0", "synced1")


def v2(**kw):
    """A version-2 state: an established TCP flow unless told otherwise."""
    values = dict(version=2, kind=int(Kind.TCP), state=int(TcpState.ESTABLISHED), orig=1, fin=0, flags=0,
                  scale0=0, scale1=0, end0=601, end1=901, maxend0=9000, maxend1=9500, maxwin0=8192,
                  maxwin1=8192, maxack0=901, maxack1=601, synced0=601, synced1=901)
    values.update(kw)
    return V2.pack(*(values[f] for f in FIELDS))


PSEUDO = dict(kind=int(Kind.UDP), state=1, orig=1, **{f: 0 for f in FIELDS[4:]})


@pytest.mark.parametrize("fields", [
    dict(scale0=14, scale1=14, maxwin0=MAX_WINDOW, maxwin1=MAX_WINDOW, flags=31, fin=3, orig=0),
    dict(state=int(TcpState.SYN_SENT)), dict(state=int(TcpState.CLOSED)),
    dict(PSEUDO), dict(PSEUDO, state=0), dict(PSEUDO, kind=int(Kind.ICMP)), dict(PSEUDO, kind=int(Kind.OTHER)),
])
def test_a_state_at_the_edges_of_every_range_decodes_field_for_field(fields):
    data = v2(**fields)
    st = FW.decode_state(data)
    values = dict(zip(FIELDS, V2.unpack(data)))
    assert (st.kind, st.state, st.orig_forward, st.fin_seen, st.flags, st.scale0, st.scale1) == (
        values["kind"], values["state"], bool(values["orig"]), values["fin"], values["flags"],
        values["scale0"], values["scale1"])
    assert all(getattr(st, f) == values[f] for f in FIELDS[8:])
    assert FW.encode_state(st) == data


@pytest.mark.parametrize("data,message", [
    (v2()[:-1], "firewall state is 48 (or 20) bytes, got 47"),
    (v2(version=1), "firewall state version 1, this release reads 2"),
    (v2(version=3), "firewall state version 3, this release reads 2"),
    (v2(kind=0), "firewall state of unknown kind 0"),
    (v2(kind=5), "firewall state of unknown kind 5"),
    (v2(flags=32), "firewall state with unknown flags or an impossible window"),
    (v2(scale0=15), "firewall state with unknown flags or an impossible window"),
    (v2(scale1=15), "firewall state with unknown flags or an impossible window"),
    (v2(maxwin0=MAX_WINDOW + 1), "firewall state with unknown flags or an impossible window"),
    (v2(maxwin1=MAX_WINDOW + 1), "firewall state with unknown flags or an impossible window"),
    (v2(orig=2), "firewall state with an impossible direction or FIN mask"),
    (v2(fin=4), "firewall state with an impossible direction or FIN mask"),
    (v2(state=0), "firewall state with unknown TCP state 0"),
    (v2(state=8), "firewall state with unknown TCP state 8"),
    (v2(**dict(PSEUDO, state=2)), "firewall pseudo-connection state with TCP fields"),
    (v2(**dict(PSEUDO, fin=1)), "firewall pseudo-connection state with TCP fields"),
] + [(v2(**dict(PSEUDO, **{f: 1})), "firewall pseudo-connection state with TCP fields")
     for f in FIELDS[5:]])
def test_a_state_out_of_range_is_refused_saying_why(data, message):
    with pytest.raises(ValueError) as err:
        FW.decode_state(data)
    assert str(err.value) == message


def test_a_state_of_older_releases_decodes_field_for_field():
    tcp_old = FW.decode_state(struct.pack("!BBBB4I", Kind.TCP, TcpState.FIN_WAIT, 0, 2, 601, 901, 500, 800))
    assert (tcp_old.kind, tcp_old.state, tcp_old.orig_forward, tcp_old.fin_seen) == (
        Kind.TCP, TcpState.FIN_WAIT, False, 2)
    assert (tcp_old.end0, tcp_old.end1, tcp_old.synced0, tcp_old.synced1) == (601, 901, 500, 800)
    assert (tcp_old.maxend0, tcp_old.maxend1, tcp_old.flags) == (601, 901, 1)
    assert (tcp_old.maxwin0, tcp_old.maxwin1, tcp_old.maxack0, tcp_old.maxack1) == (0, 0, 0, 0)
    assert (tcp_old.fresh, tcp_old.lag_until) == (0, -1.0)
    udp_old = FW.decode_state(struct.pack("!BBBB4I", Kind.UDP, 1, 1, 0, 0, 0, 0, 0))
    assert (udp_old.kind, udp_old.state, udp_old.orig_forward, udp_old.flags) == (Kind.UDP, 1, True, 0)
    for bad, message in (((Kind.TCP, 1, 2, 0), "firewall state with an impossible direction or FIN mask"),
                         ((Kind.TCP, 1, 1, 4), "firewall state with an impossible direction or FIN mask"),
                         ((Kind.TCP, 9, 1, 0), "firewall state with unknown TCP state 9"),
                         ((Kind.UDP, 2, 1, 0), "firewall pseudo-connection state with TCP fields"),
                         ((7, 1, 1, 0), "firewall state of unknown kind 7")):
        with pytest.raises(ValueError) as err:
            FW.decode_state(struct.pack("!BBBB4I", *bad, 0, 0, 0, 0))
        assert str(err.value) == message


def test_a_decoded_state_is_loose_until_its_first_packets_and_an_encoded_one_starts_with_version_2():
    st = FW.decode_state(v2())
    assert (st.fresh, st.lag_until) == (0, -1.0)
    assert FW.encode_state(handshake())[:2] == b"\x02\x01"


def test_sequence_numbers_compare_in_32_bit_serial_arithmetic():
    from dataplane.core.services.firewall import _after, _seq_le

    m = 1 << 32
    for b in (0, 1000, m - 5):
        assert _after((b + 1) % m, b) and _after((b + (1 << 31) - 1) % m, b)
        assert not _after(b, b) and not _after((b - 1) % m, b) and not _after((b + (1 << 31)) % m, b)
        assert _seq_le(b, b) and _seq_le(b, (b + (1 << 31) - 1) % m) and _seq_le((b - 1) % m, b)
        assert not _seq_le((b + 1) % m, b) and not _seq_le(b, (b + (1 << 31)) % m)


def test_deny_and_reject_ports_of_a_new_firewall():
    fw = Firewall(deny_ports=[23], reject_ports=[24])
    assert fw.process(parse(tcp(dport=23)), True, None, 0.0)[0] == Verdict(Action.DROP, "policy_denied")
    v, _ = fw.process(parse(tcp(dport=24)), True, None, 0.0)
    assert v.action == Action.REPLY and v.reason == "policy_rejected" and v.reply
    assert fw.process(parse(tcp(dport=25)), True, None, 0.0)[0].action == Action.FORWARD
    assert Firewall().process(parse(tcp(dport=23)), True, None, 0.0)[0].action == Action.FORWARD


def test_an_icmp_error_quoting_a_live_flow_passes_and_changes_nothing():
    query = udp(sport=5000, dport=53)
    err = parse(bytes(IP(src="10.2.0.10", dst="10.1.0.10") / ICMP(type=3, code=3) / IP(query)))
    _, st = step(None, query)
    before = FW.encode_state(st)
    v, after = FW.process(err, False, st, 1.0)
    assert v == Verdict(Action.FORWARD) and after is st and FW.encode_state(st) == before


def test_a_packet_of_another_protocol_opens_an_other_pseudo_connection():
    gre = bytes(IP(src="10.1.0.10", dst="10.2.0.10", proto=47) / (b"\x00\x00\x08\x00" + b"x" * 20))
    v, st = step(None, gre)
    assert v == Verdict(Action.FORWARD, mirror=True, timeout=60.0) and st.kind == Kind.OTHER
    back = bytes(IP(src="10.2.0.10", dst="10.1.0.10", proto=47) / (b"\x00\x00\x08\x00" + b"y" * 20))
    v, st = step(st, back, forward=False)
    assert v == Verdict(Action.FORWARD, mirror=True, timeout=120.0) and st.state == 1


def test_the_eviction_class_is_established_from_the_handshakes_end_to_time_wait():
    for state in TcpState:
        expect = TcpState.ESTABLISHED <= state <= TcpState.TIME_WAIT
        assert FW.established(FlowState(Kind.TCP, state)) == expect, state
    assert [FW.established(FlowState(Kind.UDP, s)) for s in (0, 1)] == [False, True]


# -- the fast path (`fast`) against `process` ----------------------------------------

from dataplane.core.services import FORWARD  # noqa: E402
from dataplane.core.services.firewall import SYNC_STRIDE  # noqa: E402


def fast_matches_process(st, data, forward=True):
    """`fast` on a copy of `st` and `process` on another: when `fast` takes
    the packet, `process` forwards it unmirrored leaving the same state;
    when it declines, it touched nothing. Returns whether it took it."""
    proto = data[9]
    a, b = copy.deepcopy(st), copy.deepcopy(st)
    took = FW.fast(a, forward, data, proto, 20, len(data))
    if took:
        v, b = FW.process(parse(data), forward, b, 0.0)
        assert v == FORWARD
        assert (a, a.fresh, a.lag_until) == (b, b.fresh, b.lag_until)
    else:
        assert (a, a.fresh, a.lag_until) == (st, st.fresh, st.lag_until)
    return took


def test_the_fast_path_takes_in_window_acks_and_data_of_an_established_flow_both_ways():
    st = handshake()
    assert fast_matches_process(st, tcp(flags="A", seq=101, ack=901))
    assert fast_matches_process(st, tcp(flags="PA", seq=101, ack=901, payload=b"x" * 500))
    assert fast_matches_process(st, tcp(*SERVER_SIDE, flags="PA", seq=901, ack=101, payload=b"y" * 300), False)
    assert fast_matches_process(st, tcp(flags="PA", seq=101 + 4000, ack=901, payload=b"z"))     # a later segment
    a, data = copy.deepcopy(st), tcp(flags="PA", seq=101, ack=901, payload=b"x" * 500)
    assert FW.fast(a, True, data, 6, 20, len(data)) and a.end0 == 601 and a.maxack0 == 901


@pytest.mark.parametrize("data,forward", [
    (tcp(flags="S", seq=101), True), (tcp(flags="FA", seq=101, ack=901), True),
    (tcp(flags="RA", seq=101, ack=901), True), (tcp(flags="SA", seq=901, ack=101), False),
    (tcp(flags="PA", seq=101 + 100_000, ack=901, payload=b"x"), True),      # out of window
    (tcp(flags="A", seq=101, ack=901 + 100_000), True),                    # acks the unsent
    (tcp(flags="", seq=101, ack=901), True),                               # no ACK flag
], ids=["syn", "fin", "rst", "synack", "out-of-window", "ack-out-of-window", "no-ack"])
def test_the_fast_path_declines_flags_and_window_edges_untouched(data, forward):
    assert not fast_matches_process(handshake(), data, forward)


def test_the_fast_path_declines_a_bad_header_length_or_a_truncated_segment():
    st = handshake()
    good = bytearray(tcp(flags="A", seq=101, ack=901, payload=b"x" * 8))
    for offset_byte in (0x40, 0xF0):                                       # 16 bytes; 60 bytes > what is there
        bad = bytearray(good)
        bad[32] = offset_byte
        a = copy.deepcopy(st)
        assert not FW.fast(a, True, bytes(bad), 6, 20, len(bad)) and a == st
    a = copy.deepcopy(st)
    assert not FW.fast(a, True, bytes(good), 6, 20, 20 + 19) and a == st    # not even a TCP header
    assert FW.fast(copy.deepcopy(st), True, bytes(good), 6, 20, 20 + 20)   # a bare header will do


def test_the_fast_path_declines_before_the_handshakes_end_liberal_catching_up_or_past_the_stride():
    st = handshake()
    ack = tcp(flags="A", seq=101, ack=901)
    for changed in (dict(state=TcpState.SYN_RECV), dict(state=TcpState.FIN_WAIT), dict(flags=st.flags | 1),
                    dict(lag_until=5.0), dict(lag_until=-1.0)):
        other = copy.deepcopy(st)
        for k, val in changed.items():
            setattr(other, k, val)
        assert not fast_matches_process(other, ack), changed
    near = copy.deepcopy(st)
    near.synced0 = (near.end0 - SYNC_STRIDE + 100) % (1 << 32)
    assert fast_matches_process(near, tcp(flags="PA", seq=101, ack=901, payload=b"x" * 99))
    assert not fast_matches_process(near, tcp(flags="PA", seq=101, ack=901, payload=b"x" * 100))
    near1 = copy.deepcopy(st)
    near1.synced1 = (near1.end1 - SYNC_STRIDE + 100) % (1 << 32)
    assert fast_matches_process(near1, tcp(*SERVER_SIDE, flags="PA", seq=901, ack=101, payload=b"y" * 99), False)
    assert not fast_matches_process(near1, tcp(*SERVER_SIDE, flags="PA", seq=901, ack=101, payload=b"y" * 100),
                                    False)


def test_the_fast_path_of_a_pseudo_connection():
    _, st = step(None, udp())
    reply = udp("10.2.0.10", "10.1.0.10", 53, 5000)
    assert fast_matches_process(st, udp())
    assert not fast_matches_process(st, reply, False)                      # the first reply changes state
    _, st = step(st, reply, forward=False)
    assert fast_matches_process(st, reply, False) and fast_matches_process(st, udp())
    a = copy.deepcopy(st)
    assert not FW.fast(a, True, tcp(flags="A"), 6, 20, 40)                 # TCP on a UDP flow: process


# -- a connection's whole state, step by step ------------------------------------------

def test_every_field_of_the_state_from_syn_to_time_wait():
    """Window scaling on both sides (7 and 5): each segment's effect on
    every tracked field, and each step's verdict."""
    mirrored = {s: Verdict(Action.FORWARD, mirror=True, timeout=TCP_TIMEOUTS[s]) for s in TcpState}
    v, st = step(None, syn_with(1000, 7, flags="S", seq=100))
    assert v == mirrored[TcpState.SYN_SENT]
    assert st == FlowState(Kind.TCP, TcpState.SYN_SENT, True, 0, end0=101, synced0=101, maxend0=101,
                           maxwin0=1000, scale0=7, flags=8)
    v, st = step(st, synack_with(2000, 5, flags="SA", seq=900, ack=101), forward=False)
    assert v == mirrored[TcpState.SYN_RECV] and st.fresh == 3
    assert st == FlowState(Kind.TCP, TcpState.SYN_RECV, True, 0, end0=101, end1=901, synced0=101, synced1=901,
                           maxend0=2101, maxend1=901, maxwin0=1000, maxwin1=2000, maxack1=101, scale0=7,
                           scale1=5, flags=8 | 16 | 4)
    v, st = step(st, bytes(IP(src="10.1.0.10", dst="10.2.0.10")
                           / ScapyTCP(sport=40000, dport=80, flags="A", seq=101, ack=901, window=500)))
    assert v == mirrored[TcpState.ESTABLISHED]
    assert st == FlowState(Kind.TCP, TcpState.ESTABLISHED, True, 0, end0=101, end1=901, synced0=101,
                           synced1=901, maxend0=2101, maxend1=901 + (500 << 7), maxwin0=500 << 7, maxwin1=2000,
                           maxack0=901, maxack1=101, scale0=7, scale1=5, flags=8 | 16 | 4 | 2)
    v, st = step(st, bytes(IP(src="10.2.0.10", dst="10.1.0.10")
                           / ScapyTCP(sport=80, dport=40000, flags="PA", seq=901, ack=101, window=100)
                           / (b"y" * 300)), forward=False)
    assert v == FORWARD
    assert (st.end1, st.maxwin1, st.maxack1, st.maxend0, st.synced1) == (1201, 100 << 5, 101, 101 + (100 << 5), 901)
    v, st = step(st, tcp(flags="FA", seq=101, ack=1201))
    assert v == mirrored[TcpState.FIN_WAIT] and st.fin_seen == 1 and st.end0 == 102 and st.maxack0 == 1201
    assert (st.synced0, st.synced1) == (102, 1201)
    v, st = step(st, tcp(*SERVER_SIDE, flags="FA", seq=1201, ack=102), forward=False)
    assert v == mirrored[TcpState.CLOSING] and st.fin_seen == 3 and st.end1 == 1202
    v, st = step(st, tcp(flags="A", seq=102, ack=1202))
    assert v == mirrored[TcpState.TIME_WAIT]
    v, st = step(st, tcp(flags="A", seq=102, ack=1202))
    assert v == FORWARD and st.state == TcpState.TIME_WAIT


def test_a_syn_without_window_scale_or_window_and_with_data():
    v, st = step(None, syn_with(0, None, flags="S", seq=100) + b"")
    assert (st.maxwin0, st.scale0, st.flags, st.end0) == (1, 0, 0, 101)
    _, st = step(None, tcp(flags="S", seq=100, payload=b"hello"))                 # data on the SYN
    assert st.end0 == st.maxend0 == st.synced0 == 106
    _, st = step(st, synack_with(0, 5, flags="SA", seq=900, ack=106), forward=False)
    assert (st.maxwin1, st.scale0, st.scale1, st.flags) == (1, 0, 0, 16 | 4)    # one side offered: none


def test_syns_retransmitted_or_out_of_place():
    _, st = step(None, tcp(flags="S", seq=100))
    v, again = step(copy.deepcopy(st), tcp(flags="S", seq=100))
    assert v == FORWARD and again == st                                        # the client retransmits
    _, st = step(st, tcp(*SERVER_SIDE, flags="SA", seq=900, ack=101), forward=False)
    v, again = step(copy.deepcopy(st), tcp(*SERVER_SIDE, flags="SA", seq=900, ack=101), forward=False)
    assert v == FORWARD and again == st                                        # so does the server
    _, est = step(st, tcp(flags="A", seq=101, ack=901))
    v, _ = step(copy.deepcopy(est), tcp(*SERVER_SIDE, flags="SA", seq=900, ack=101), forward=False)
    assert v == FORWARD                                                        # late, after the handshake
    for data, forward in ((tcp(*SERVER_SIDE, flags="S", seq=900), False), (tcp(flags="SA", seq=100, ack=5), True)):
        v, after = step(copy.deepcopy(est), data, forward)
        assert v == Verdict(Action.DROP, "unexpected_syn") and after == est


def test_an_icmp_packet_other_than_an_echo_request_opens_nothing():
    v, st = step(None, bytes(IP(src="10.1.0.10", dst="10.2.0.10") / ICMP(type=0, id=3)))
    assert (v, st) == (Verdict(Action.DROP, "misdelivery"), None)


def test_a_new_udp_flow_to_a_denied_port_is_dropped_by_policy():
    assert step(None, udp(dport=23)) == (Verdict(Action.DROP, "policy_denied"), None)


def test_the_fast_path_declines_a_buffer_shorter_than_a_tcp_header_or_another_protocol():
    st = handshake()
    data = tcp(flags="A", seq=101, ack=901)
    a = copy.deepcopy(st)
    assert not FW.fast(a, True, data[:39], 6, 20, 39) and a == st
    assert not FW.fast(a, True, data[:30], 6, 20, 30) and a == st
    as_udp = bytearray(data)
    as_udp[9] = 17
    assert not FW.fast(a, True, bytes(as_udp), 17, 20, len(as_udp)) and a == st


def test_the_fast_path_takes_a_retransmission_of_bytes_already_mirrored():
    st, seq = handshake(), 101
    while True:                                    # until the progress is mirrored (a stride)
        v, st = step(st, tcp(flags="A", seq=seq, ack=901, payload=b"y" * 8000))
        seq += 8000
        _, st = step(st, tcp(*SERVER_SIDE, flags="A", seq=901, ack=seq), forward=False)
        if v.mirror:
            break
    assert st.synced0 == st.end0 == seq
    assert fast_matches_process(st, tcp(flags="A", seq=seq - 2000, ack=901, payload=b"y" * 1000))


def test_the_fast_path_takes_a_retransmission_of_server_bytes_already_mirrored():
    st, seq = handshake(), 901
    while True:
        v, st = step(st, tcp(*SERVER_SIDE, flags="A", seq=seq, ack=101, payload=b"s" * 8000), forward=False)
        seq += 8000
        _, st = step(st, tcp(flags="A", seq=101, ack=seq))
        if v.mirror:
            break
    assert st.synced1 == st.end1 == seq
    assert fast_matches_process(st, tcp(*SERVER_SIDE, flags="A", seq=seq - 2000, ack=101, payload=b"s" * 1000),
                                False)


def test_the_fast_path_learns_an_acknowledgement_of_new_data():
    st = handshake()
    _, st = step(st, tcp(*SERVER_SIDE, flags="PA", seq=901, ack=101, payload=b"s" * 300), forward=False)
    assert fast_matches_process(st, tcp(flags="A", seq=101, ack=1201))
    a, data = copy.deepcopy(st), tcp(flags="A", seq=101, ack=1201)
    assert FW.fast(a, True, data, 6, 20, len(data)) and a.maxack0 == 1201 and a.maxend1 == 1201 + 8192
