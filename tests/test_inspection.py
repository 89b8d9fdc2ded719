"""Inspection: app id, cross-packet patterns, and partial-match state that survives a move."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP as SIP, TCP as STCP, UDP as SUDP
from scapy.packet import Raw

from dataplane.core import header as wire
from dataplane.core.node import ServiceNode
from dataplane.core.packet import parse
from dataplane.core.services import FORWARD, Action, Verdict, create
from dataplane.core.services.inspection import HISTORY, RECOVERY, FlowAction, Inspection, Rule, Stream
from tests.conftest import codes_led_by, pair_map, tcp

RULES = [{"name": "exfil", "pattern": "SECRET-TOKEN"}]


def send(svc, st, payload, forward=True):
    """The next in-order segment of the direction (its stream's next sequence number)."""
    stream = st.streams[0 if forward else 1] if st is not None else None
    seq = stream.nxt if stream is not None and stream.synced else 1000
    return svc.process(parse(tcp(flags="PA", seq=seq, payload=payload)), forward, st, 0.0)


def test_app_detection():
    svc = Inspection()
    v, st = send(svc, None, b"GET / HTTP/1.1\r\n")
    assert st.app == "http" and st.action == FlowAction.ALLOW and v.mirror
    _, st = send(Inspection(), None, b"\x16\x03\x01\x02\x00")
    assert st.app == "tls"
    svc = Inspection(rules=RULES)
    st = None
    for _ in range(3):
        _, st = send(svc, st, b"zzz")
    assert st.app == "unknown" and st.action == FlowAction.INSPECT


def test_pattern_split_across_packets_blocks():
    svc = Inspection(rules=RULES)
    v, st = send(svc, None, b"...SECRET-")
    assert v.action == Action.FORWARD and v.mirror
    v, st = send(svc, st, b"TOKEN...")
    assert v.action == Action.DROP and v.reason == "blocked" and st.matched == "exfil"
    v, st = send(svc, st, b"harmless")
    assert v.reason == "blocked"


def test_directions_are_separate_streams():
    svc = Inspection(rules=RULES)
    _, st = send(svc, None, b"SECRET-")
    v, st = send(svc, st, b"TOKEN", forward=False)
    assert v.action == Action.FORWARD


@pytest.mark.parametrize("mirrored", [True, False])
def test_partial_match_state_survives_a_move(mirrored):
    """First half on one instance, second half on another: caught only if the
    first instance's state was carried over (the failover case)."""
    first, second = Inspection(rules=RULES), Inspection(rules=RULES)
    _, st = send(first, None, b"header SECRET-")
    carried = second.decode_state(first.encode_state(st)) if mirrored else None
    v, _ = send(second, carried, b"TOKEN trailer")
    assert (v.reason == "blocked") is mirrored


def test_limit_turns_to_allow_and_state_round_trips():
    svc = Inspection(rules=RULES, inspect_limit=100)
    _, st = send(svc, None, b"a" * 150)
    assert st.action == FlowAction.INSPECT and st.streams[0].tail == b"" and st.streams[0].scanned == 150
    _, st = send(svc, st, b"b" * 150, forward=False)
    assert st.action == FlowAction.ALLOW and [s.tail for s in st.streams] == [b"", b""]
    assert svc.decode_state(svc.encode_state(st)) == st
    with pytest.raises(ValueError):
        svc.decode_state(b"\x00" * 5)
    with pytest.raises(ValueError):
        Inspection(rules=[{"name": "x", "pattern": ""}])


# --- issue #14 finding 1: reassembly by sequence number -------------------------------

ISN_C, ISN_S = 1000, 9000
H = "10.1.0.10", "10.2.0.10"


def seg(seq: int, payload: bytes = b"", flags: str = "PA", forward: bool = True, ack: int = 0,
        chksum: int | None = None):
    """A TCP segment of the flow, either direction, with a chosen checksum."""
    src, dst = H if forward else H[::-1]
    sport, dport = (40000, 80) if forward else (80, 40000)
    t = STCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
    if chksum is not None:
        t.chksum = chksum
    return parse(bytes(SIP(src=src, dst=dst) / t / Raw(payload)))


def handshake(svc):
    """SYN, SYN/ACK: both directions' next sequence numbers known."""
    _, st = svc.process(seg(ISN_C, flags="S"), True, None, 0.0)
    _, st = svc.process(seg(ISN_S, flags="SA", forward=False, ack=ISN_C + 1), False, st, 0.0)
    return st


def run(svc, st, segments, forward=True):
    """Feed (offset, bytes) pairs of one direction; the segments forwarded, and the verdicts."""
    isn = ISN_C if forward else ISN_S
    passed, verdicts = [], []
    for off, data in segments:
        v, st = svc.process(seg(isn + 1 + off, data, forward=forward), forward, st, 0.0)
        verdicts.append(v)
        if v.action == Action.FORWARD:
            passed.append((off, data))
    return st, passed, verdicts


def receivable(passed) -> list[bytes]:
    """What a receiving TCP could reassemble from the forwarded segments: with
    the first copy of overlapping bytes winning, and with the last one
    winning (a server that never got the first copy, as an attacker arranges
    with a TTL that expires past the middlebox)."""
    out = []
    for order in (passed, passed[::-1]):
        buf: dict[int, int] = {}
        for off, data in order:
            for i, b in enumerate(data):
                buf.setdefault(off + i, b)
        stream = bytearray()
        while len(stream) in buf:
            stream.append(buf[len(stream)])
        out.append(bytes(stream))
    return out


def leaked(passed) -> bool:
    return any(b"SECRET-TOKEN" in s for s in receivable(passed))


def test_reverse_order_segments_do_not_evade():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, passed, vs = run(svc, st, [(7, b"TOKEN"), (0, b"SECRET-"), (7, b"TOKEN")])
    assert vs[0].action == Action.DROP and vs[0].reason == "out_of_order"
    assert vs[1].action == Action.FORWARD
    assert vs[2].reason == "blocked" and st.action == FlowAction.BLOCK
    assert not leaked(passed)


def test_three_segments_out_of_order_do_not_evade():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    parts = [(8, b"OKEN"), (0, b"SECR"), (4, b"ET-T")]
    st, passed, vs = run(svc, st, parts + [(8, b"OKEN")])   # the sender retransmits
    assert [v.reason for v in vs] == ["out_of_order", "", "", "blocked"]
    assert not leaked(passed)


def test_bad_checksum_segment_is_dropped_before_it_is_scanned():
    """A segment the server will discard (bad checksum) must not be what
    the inspection scanned in place of the one the server keeps."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    v, st = svc.process(seg(ISN_C + 1, b"SECRET-"), True, st, 0.0)
    assert v.action == Action.FORWARD
    v, st = svc.process(seg(ISN_C + 8, b"XXXXX", chksum=0x1234), True, st, 0.0)
    assert v.action == Action.DROP and v.reason == "bad_checksum"
    v, st = svc.process(seg(ISN_C + 8, b"TOKEN"), True, st, 0.0)
    assert v.reason == "blocked"


def test_overlap_with_other_bytes_is_dropped():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, passed, vs = run(svc, st, [(0, b"SECRET-XXXXX"), (7, b"TOKEN")])
    assert vs[0].action == Action.FORWARD
    assert vs[1].action == Action.DROP and vs[1].reason == "overlap_mismatch"
    assert not leaked(passed)


def test_benign_stream_passes_with_reordering_and_retransmissions():
    """Control: a real TCP's behaviour (in order, an identical
    retransmission, a segment ahead that is retransmitted) passes whole."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    data = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n" * 4
    parts = [(i, data[i:i + 30]) for i in range(0, len(data), 30)]
    order = [parts[0], parts[2], parts[1], parts[2], parts[0]] + parts[3:]
    st, passed, vs = run(svc, st, order)
    assert [v.reason for v in vs].count("out_of_order") == 1
    assert receivable(passed) == [data, data]
    assert st.action == FlowAction.INSPECT and st.app == "http"


def test_pattern_split_across_in_order_segments_blocks():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, passed, vs = run(svc, st, [(0, b"..SECRET-"), (9, b"TOKEN..")])
    assert vs[1].reason == "blocked" and not leaked(passed)


def test_limit_counts_per_direction():
    """1 MiB from the server does not turn the client's direction to allow."""
    svc = Inspection(rules=RULES, inspect_limit=1 << 20)
    st = handshake(svc)
    chunk = b"x" * 32000
    off = 0
    while off <= 1 << 20:
        v, st = svc.process(seg(ISN_S + 1 + off, chunk, forward=False, ack=ISN_C + 1), False, st, 0.0)
        assert v.action == Action.FORWARD
        off += len(chunk)
        _, st = svc.process(seg(ISN_C + 1, b"", flags="A", ack=ISN_S + 1 + off), True, st, 0.0)
    v, st = svc.process(seg(ISN_C + 1, b"SECRET-TOKEN", ack=ISN_S + 1 + off), True, st, 0.0)
    assert v.reason == "blocked"


def test_a_direction_past_its_limit_is_no_longer_scanned():
    """Control of the per-direction limit: the limit still ends inspection
    of the direction that carried it."""
    svc = Inspection(rules=RULES, inspect_limit=100)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"a" * 150)])
    st, _, vs = run(svc, st, [(150, b"SECRET-TOKEN")])
    assert vs[0].action == Action.FORWARD
    st, _, vs = run(svc, st, [(0, b"b" * 150), (150, b"SECRET-TOKEN")], forward=False)
    assert vs[1].action == Action.FORWARD and st.action == FlowAction.ALLOW


@pytest.mark.parametrize("mirrored", [True, False])
def test_reassembly_state_survives_a_move(mirrored):
    """First half on the primary, the state mirrored, the second half on the
    promoted secondary: blocked, only when the state was carried over."""
    first, second = Inspection(rules=RULES), Inspection(rules=RULES)
    st = handshake(first)
    st, _, _ = run(first, st, [(0, b"header SECRET-")])
    carried = second.decode_state(first.encode_state(st)) if mirrored else None
    _, _, vs = run(second, carried, [(14, b"TOKEN trailer")])
    assert (vs[0].reason == "blocked") is mirrored


def test_a_direction_waits_for_its_receiver_past_the_history():
    """Every unacknowledged byte stays comparable: a sender more than
    HISTORY bytes past its receiver's ack is dropped until the ack comes."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, vs = run(svc, st, [(0, b"a" * 40000), (40000, b"b" * 30000)])
    assert [v.reason for v in vs] == ["", "inspect_window"]
    _, st = svc.process(seg(ISN_S + 1, b"", flags="A", forward=False, ack=ISN_C + 1 + 40000), False, st, 0.0)
    st, _, vs = run(svc, st, [(40000, b"b" * 30000)])
    assert vs[0].action == Action.FORWARD and len(st.streams[0].history) == 30000


def test_acknowledged_bytes_are_not_kept_and_acks_past_the_stream_are_ignored():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"0123456789")])
    _, st = svc.process(seg(ISN_S + 1, flags="A", forward=False, ack=ISN_C + 1 + 4), False, st, 0.0)
    assert bytes(st.streams[0].history) == b"456789"
    _, st = svc.process(seg(ISN_S + 1, flags="A", forward=False, ack=ISN_C + 1 + 99), False, st, 0.0)
    assert st.streams[0].acked == ISN_C + 1 + 4      # a forged ack cannot make it skip
    st, _, vs = run(svc, st, [(4, b"45XX89")])
    assert vs[0].reason == "overlap_mismatch"


def test_a_promoted_state_resumes_where_the_stream_is():
    """The mirror lags the primary: the promoted instance's first segment
    may start past the mirrored position; it is scanned, not dropped (a
    drop would stall the connection: the receiver acknowledged the gap).
    Control: the primary itself drops a segment past a gap."""
    primary, promoted = Inspection(rules=RULES), Inspection(rules=RULES)
    st = handshake(primary)
    st, _, _ = run(primary, st, [(0, b"first ")])
    mirrored = primary.encode_state(st)
    st, _, _ = run(primary, st, [(6, b"second ")])   # forwarded, its mirror lost
    _, _, vs = run(primary, st, [(20, b"ahead")])
    assert vs[0].reason == "out_of_order"
    carried = promoted.decode_state(mirrored)
    carried, _, vs = run(promoted, carried, [(13, b"third SECRET-")])
    assert vs[0].action == Action.FORWARD
    carried, _, vs = run(promoted, carried, [(26, b"TOKEN")])
    assert vs[0].reason == "blocked"


def test_decoded_state_is_validated():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"GET /SECRET-")])
    good = svc.encode_state(st)
    assert svc.encode_state(svc.decode_state(good)) == good
    bad = [b"\x02" + good[1:],                                  # a newer layout
           good[:21] + b"\x02" + good[22:],                     # synced flag out of range
           good + b"x"]
    unsynced = Inspection(rules=RULES).encode_state(Inspection(rules=RULES).process(
        parse(tcp(flags="A", seq=5)), True, None, 0.0)[1])
    bad.append(unsynced[:21] + b"\x00" + (77).to_bytes(4, "big") + unsynced[26:])  # position, no start
    far = bytearray(good)
    far[26:30] = ((ISN_C + 1 - 70000) % (1 << 32)).to_bytes(4, "big")      # acked 70000 behind
    bad.append(bytes(far))
    for data in bad:
        with pytest.raises(ValueError):
            svc.decode_state(data)
    with pytest.raises(ValueError):
        Inspection(rules=[{"name": "long", "pattern": "x" * 3000}])
    with pytest.raises(ValueError):
        Inspection(rules=[{"name": "n" * 300, "pattern": "x"}])


def test_checksums_left_to_offload_are_not_verified():
    """A host with checksum offload hands segments over with the checksum
    unfilled (the GSO option's NEEDS_CSUM): the node says so and the
    segment is inspected; the same segment without the option is dropped."""
    m = pair_map()
    code = codes_led_by(m, "ba")[0]
    bad = bytes(SIP(src=H[0], dst=H[1]) / STCP(sport=40000, dport=80, flags="PA", seq=5, chksum=0x1234)
                / Raw(b"hello"))
    for options, counted in ((b"", 1), (wire.pack_gso(1, 0, 0, 0, 20, 16), 0)):
        node = ServiceNode("ba", m, create("inspection", rules=RULES))
        head = wire.pack(1, 1, code, 1, m.epoch, 0, 63, words=5 + len(options) // 4)
        node.from_fabric(head + options + bad, "ingress", 0.0)
        assert node.drops["bad_checksum"] == counted
        assert node.counters["forwarded"] == 1 - counted


def test_udp_checksums_are_verified_too():
    svc = Inspection(rules=RULES)
    good = SIP(src=H[0], dst=H[1]) / SUDP(sport=5000, dport=53) / Raw(b"SECRET-TOKEN")
    v, _ = svc.process(parse(bytes(good)), True, None, 0.0)
    assert v.reason == "blocked"
    good[SUDP].chksum = 0x4321
    v, st = svc.process(parse(bytes(good)), True, None, 0.0)
    assert v.reason == "bad_checksum" and st is None
    good[SUDP].chksum = 0                                       # none: not checked
    v, _ = svc.process(parse(bytes(good)), True, None, 0.0)
    assert v.reason == "blocked"


def test_a_reassembling_state_is_shown_by_the_flows_query():
    """The forwarder's flows query turns states into JSON: the history
    buffer is shown by its length (a bytearray broke the query, and with it
    the lab's forwarders, before)."""
    import json

    from dataplane.shells.forwarder import plain

    svc = Inspection(rules=RULES)
    st, _, _ = run(svc, handshake(svc), [(0, b"GET / HTTP/1.1\r\n")])
    shown = json.loads(json.dumps(plain(st)))
    assert shown["streams"][0]["history"] == 16 and shown["app"] == "http"


def test_fast_path_of_a_finished_direction_matches_process():
    """A direction past its limit takes the node's cache (`fast`) while the
    other is still inspected; it must do what `process` does, including
    taking a partial acknowledgement (a delayed ACK) for the other stream."""
    import copy

    svc = Inspection(rules=RULES, inspect_limit=100)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"c" * 150)])                              # client direction done
    st, _, _ = run(svc, st, [(0, b"s" * 40), (40, b"s" * 40)], forward=False)
    ack = bytes(SIP(src=H[0], dst=H[1]) / STCP(sport=40000, dport=80, flags="A", seq=ISN_C + 151,
                                              ack=ISN_S + 1 + 40))
    full, cached = copy.deepcopy(st), copy.deepcopy(st)
    v, full = svc.process(parse(ack), True, full, 0.0)
    assert v.action == Action.FORWARD and not v.mirror
    assert svc.fast(cached, True, ack, 6, 20, len(ack))
    assert cached == full and cached.streams[1].acked == ISN_S + 1 + 40
    assert bytes(cached.streams[1].history) == bytes(full.streams[1].history) == b"s" * 40
    assert not svc.fast(cached, False, ack, 6, 20, len(ack))              # the inspected direction: no


def test_a_promoted_state_follows_the_receiver_past_what_the_dead_primary_forwarded():
    """The dead primary forwarded bytes past the mirror; the sender first
    retransmits the one segment the receiver lacks, then goes on with new
    data far ahead, and never sends the rest again (the receiver has it).
    The promoted instance must follow (by the segment, or by the receiver's
    ack) for RECOVERY seconds; a stall here broke transfers in the lab's
    A-failover test. Control: after RECOVERY a gap is out of order again."""
    primary, promoted = Inspection(rules=RULES), Inspection(rules=RULES)
    st = handshake(primary)
    st, _, _ = run(primary, st, [(0, b"a" * 100)], forward=False)
    carried = promoted.decode_state(primary.encode_state(st))        # mirror at server offset 100
    v, carried = promoted.process(seg(ISN_S + 101, b"b" * 50, forward=False), False, carried, 1.0)
    assert v.action == Action.FORWARD                                 # the retransmitted segment
    v, carried = promoted.process(seg(ISN_S + 401, b"c" * 50, forward=False), False, carried, 1.1)
    assert v.action == Action.FORWARD                                 # new data past the gap
    _, carried = promoted.process(seg(ISN_C + 1, flags="A", ack=ISN_S + 601), True, carried, 1.2)
    v, carried = promoted.process(seg(ISN_S + 601, b"SECRET-TOKEN", forward=False), False, carried, 1.3)
    assert v.reason == "blocked"                                      # resumed by the ack, still scanning
    carried = promoted.decode_state(primary.encode_state(st))
    _, carried = promoted.process(seg(ISN_S + 101, b"b" * 50, forward=False), False, carried, 1.0)
    v, _ = promoted.process(seg(ISN_S + 401, b"c" * 50, forward=False), False, carried, 1.0 + 4.0)
    assert v.reason == "out_of_order"


def test_a_flow_that_comes_back_rerouted_recovers_like_a_promoted_one():
    """An instance's own state of a flow falls behind while the flow runs
    through another instance (it moved away, then back when that one
    failed): the next packet, past the position held, arrives REROUTED and
    must pass, else drop-ahead waits for a gap nobody fills (a stall the
    lab's A-failover test saw). Control: the same packet without REROUTED
    is out of order (a client cannot set the flag: the ingress writes it)."""
    m = pair_map()
    code = codes_led_by(m, "ba")[0]

    def wrapped(flags: int, seq: int, payload: bytes, tcp_flags: str = "PA") -> bytes:
        inner = bytes(SIP(src=H[0], dst=H[1]) / STCP(sport=40000, dport=80, flags=tcp_flags, seq=seq)
                      / Raw(payload))
        return wire.pack(1, 1, code, 1, m.epoch, flags) + inner

    for flags, passed in ((int(wire.Flags.REROUTED), 1), (0, 0)):
        node = ServiceNode("ba", m, create("inspection", rules=RULES))
        node.from_fabric(wrapped(0, ISN_C, b"", "S"), "ingress", 0.0)
        node.from_fabric(wrapped(0, ISN_C + 1, b"a" * 100), "ingress", 0.1)   # held here at +101
        before = node.counters["forwarded"]
        node.from_fabric(wrapped(flags, ISN_C + 5001, b"b" * 100), "ingress", 0.2)  # went on elsewhere
        assert node.counters["forwarded"] - before == passed
        assert node.drops["out_of_order"] == 1 - passed
        node.from_fabric(wrapped(0, ISN_C + 5101, b"SECRET-TOKEN"), "ingress", 0.3)
        assert node.drops["blocked"] == passed                  # still scanning after it came back


# --- reassembly edges, acknowledgements and what is mirrored ----------------------------

def test_a_block_is_mirrored_so_the_replica_blocks_too():
    svc = Inspection(rules=RULES)
    _, st = send(svc, None, b"SECRET-")
    v, st = send(svc, st, b"TOKEN")
    assert v.action == Action.DROP and v.reason == "blocked" and v.mirror


def test_the_syn_ack_is_mirrored_it_starts_the_servers_stream():
    svc = Inspection(rules=RULES)
    _, st = svc.process(seg(ISN_C, flags="S"), True, None, 0.0)
    v, st = svc.process(seg(ISN_S, flags="SA", forward=False, ack=ISN_C + 1), False, st, 0.0)
    assert v == Verdict(Action.FORWARD, mirror=True, timeout=600.0)
    assert st.streams[1].synced and st.streams[1].nxt == ISN_S + 1
    assert [s.tail for s in st.streams] == [b"", b""]          # a stream starts with no carry-over


def test_data_on_a_syn_is_scanned_from_the_byte_after_the_syn():
    """A SYN may carry data (TCP Fast Open): it is the stream's first bytes."""
    svc = Inspection(rules=RULES)
    v, st = svc.process(seg(ISN_C, b"SECRET-TOKEN", flags="S"), True, None, 0.0)
    assert v.action == Action.DROP and v.reason == "blocked"
    v, st = svc.process(seg(ISN_C, b"..SECRET-", flags="S"), True, None, 0.0)
    assert v.action == Action.FORWARD and st.streams[0].nxt == ISN_C + 1 + 9
    st, _, vs = run(svc, st, [(9, b"TOKEN")])
    assert vs[0].reason == "blocked"


def test_the_payload_of_a_rst_is_not_scanned_nor_taken_as_stream_bytes():
    """A receiver delivers no RST payload, so none is scanned."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    v, st = svc.process(seg(ISN_C + 1, b"SECRET-TOKEN", flags="R"), True, st, 0.0)
    assert v.action == Action.FORWARD and st.streams[0].nxt == ISN_C + 1
    assert st.streams[0].scanned == 0 and st.action == FlowAction.INSPECT


def test_a_late_syn_does_not_move_a_stream_that_carried_data():
    """A SYN (retransmitted late, or forged) after data was scanned and
    acknowledged must not restart the stream at its sequence number."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"0123456789")])
    _, st = svc.process(seg(ISN_S + 1, flags="A", forward=False, ack=ISN_C + 11), False, st, 0.0)
    assert not st.streams[0].history
    _, st = svc.process(seg(5000, flags="S"), True, st, 0.0)
    st, _, vs = run(svc, st, [(10, b"SECRET-TOKEN")])
    assert vs[0].reason == "blocked"


def test_a_new_syn_before_any_data_restarts_the_stream():
    """The client gave up and sent a SYN with another initial sequence
    number before any data: its stream starts there."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    _, st = svc.process(seg(7000, flags="S"), True, st, 0.0)
    assert st.streams[0].nxt == 7001
    v, st = svc.process(seg(7001, b"SECRET-TOKEN"), True, st, 0.0)
    assert v.reason == "blocked"


def test_a_segment_ahead_of_the_stream_is_out_of_order_by_one_byte_or_a_gigabyte():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"abc")])
    for ahead in (1, 1 << 30, (1 << 31) - 1):
        v, st = svc.process(seg((ISN_C + 4 + ahead) % (1 << 32), b"SECRET-TOKEN"), True, st, 0.0)
        assert v.action == Action.DROP and v.reason == "out_of_order", ahead
    assert st.streams[0].nxt == ISN_C + 4


def test_a_segment_half_the_sequence_space_away_is_taken_as_old_bytes():
    """Serial arithmetic's boundary: 2^31 away counts as behind (acknowledged
    long ago, not scanned again), not as ahead."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"abc")])
    v, st = svc.process(seg((ISN_C + 4 + (1 << 31)) % (1 << 32), b"xyz"), True, st, 0.0)
    assert v.action == Action.FORWARD and st.streams[0].nxt == ISN_C + 4


def test_an_identical_retransmission_passes_and_its_new_bytes_are_scanned():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, vs = run(svc, st, [(0, b"0123456789"), (0, b"0123456789"), (3, b"3456")])
    assert [v.action for v in vs] == [Action.FORWARD] * 3 and vs[1].reason == ""
    st, _, vs = run(svc, st, [(4, b"456789SECRET-TOKEN")])      # old bytes, then new ones
    assert vs[0].reason == "blocked"


def test_acknowledged_bytes_of_a_retransmission_are_neither_compared_nor_scanned():
    """The receiver discards bytes it acknowledged: a retransmission reaching
    back into them passes whatever they hold; its unacknowledged bytes are
    still compared with what was scanned."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"a" * 20)])
    _, st = svc.process(seg(ISN_S + 1, flags="A", forward=False, ack=ISN_C + 1 + 16), False, st, 0.0)
    assert bytes(st.streams[0].history) == b"aaaa"
    st, _, vs = run(svc, st, [(0, b"SECRET-TOKEN" + b"a" * 8), (0, b"b" * 16 + b"aaaa"),
                              (0, b"a" * 16 + b"aaab")])
    assert [v.reason for v in vs] == ["", "", "overlap_mismatch"]


def test_a_promoted_state_scans_retransmitted_bytes_it_has_no_history_for():
    """A decoded state has no history: unacknowledged bytes retransmitted to
    it are scanned on their own (from their first byte) instead of compared."""
    primary, promoted = Inspection(rules=RULES), Inspection(rules=RULES)
    st = handshake(primary)
    st, _, _ = run(primary, st, [(0, b"a" * 100)])
    mirrored = primary.encode_state(st)
    carried = promoted.decode_state(mirrored)
    _, _, vs = run(promoted, carried, [(50, b"SECRET-TOKEN" + b"a" * 38)])
    assert vs[0].reason == "overlap_mismatch"
    carried = promoted.decode_state(mirrored)
    _, _, vs = run(promoted, carried, [(50, b"a" * 50)])
    assert vs[0].action == Action.FORWARD


def test_a_direction_may_run_exactly_history_bytes_ahead_of_its_receiver():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, vs = run(svc, st, [(0, b"a" * 40000), (40000, b"b" * (HISTORY - 40000)), (HISTORY, b"c")])
    assert [v.action for v in vs] == [Action.FORWARD, Action.FORWARD, Action.DROP]
    assert vs[2].reason == "inspect_window"


def test_an_acknowledgement_of_some_scanned_bytes_trims_the_history_by_as_many():
    s = Stream(True, nxt=1010, acked=1000, history=bytearray(b"0123456789"))
    s.ack(1001)
    assert s.acked == 1001 and bytes(s.history) == b"123456789"
    s.ack(1001)
    assert s.acked == 1001 and bytes(s.history) == b"123456789"
    s.ack(1011)                                              # past the scanned bytes: ignored
    assert (s.nxt, s.acked) == (1010, 1001)


def test_a_recovering_stream_follows_acknowledgements_past_its_position_within_a_quarter_of_the_space():
    """A decoded stream takes an ack past its position as bytes the dead
    primary forwarded (up to 2^30 ahead); an ack inside what it scanned
    only moves `acked`; one ahead by 2^30 or more, or behind, is ignored."""
    s = Stream(True, nxt=1100, acked=1000, tail=b"SECRET-", recovering=True)
    s.ack(1050)
    assert (s.nxt, s.acked, s.tail) == (1100, 1050, b"SECRET-")
    s.ack(1100)                                              # exactly what it scanned
    assert (s.nxt, s.acked, s.tail) == (1100, 1100, b"SECRET-")
    s.ack(1200)
    assert (s.nxt, s.acked, s.tail) == (1200, 1200, b"")
    s.ack(1200 + (1 << 30))
    assert s.nxt == 1200
    s.ack(1190)
    assert s.nxt == 1200
    s.ack(1200 + (1 << 30) - 1)
    assert s.nxt == s.acked == 1200 + (1 << 30) - 1


def test_a_flow_that_comes_back_starts_its_recovery_clock_at_its_next_packet():
    """`moved` at any time: the RECOVERY seconds count from the next packet."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"a" * 100)])
    st = svc.moved(st)
    v, st = svc.process(seg(ISN_C + 1 + 5000, b"b" * 100), True, st, 100.0)
    assert v.action == Action.FORWARD and st.streams[0].recover_until == 100.0 + RECOVERY
    v, st = svc.process(seg(ISN_C + 1 + 5100, b"SECRET-TOKEN"), True, st, 100.5)
    assert v.reason == "blocked"


def test_rules_may_be_given_as_rule_objects():
    svc = Inspection(rules=(Rule("exfil", b"SECRET-TOKEN"),))
    _, st = send(svc, None, b"SECRET-")
    v, st = send(svc, st, b"TOKEN")
    assert v.reason == "blocked" and st.matched == "exfil"


def test_rule_options_are_checked_at_their_limits_saying_why():
    assert Inspection(rules=[{"name": "n" * 255, "pattern": "x"}])
    assert Inspection(rules=[{"name": "p", "pattern": "x" * 1764}]).keep == 1763   # the state's 4096 bytes
    for rules, message in (
            ([{"name": "e", "pattern": ""}], "inspection rule with an empty pattern"),
            ([{"name": "n" * 256, "pattern": "x"}],
             "inspection rule name longer than 255 bytes (the mirrored state's limit)"),
            ([{"name": "p", "pattern": "x" * 1765}], "inspection rule pattern too long for the mirrored state")):
        with pytest.raises(ValueError) as err:
            Inspection(rules=rules)
        assert str(err.value) == message


def test_the_carry_over_is_one_byte_short_of_the_longest_pattern():
    """Enough to catch a pattern split anywhere, down to its last byte
    alone in the next segment; and what a state may carry when decoded."""
    svc = Inspection(rules=RULES)
    _, st = send(svc, None, b"x" * 50 + b"SECRET-TOKE")
    assert st.streams[0].tail == b"SECRET-TOKE"
    v, st = send(svc, st, b"N")
    assert v.reason == "blocked"
    short = Inspection(rules=[{"name": "ab", "pattern": "ab"}])
    _, st = send(short, None, b"xyz")
    assert st.streams[0].tail == b"z"
    with pytest.raises(ValueError, match="inspection stream state out of range"):
        Inspection().decode_state(short.encode_state(st))           # no rules: no carry-over


def test_an_icmp_error_passes_with_a_live_flow_and_is_dropped_with_a_blocked_one_or_none():
    from scapy.layers.inet import ICMP as SICMP

    svc = Inspection(rules=RULES)
    query = bytes(SIP(src=H[0], dst=H[1]) / SUDP(sport=5000, dport=53) / Raw(b"q"))
    err = parse(bytes(SIP(src=H[1], dst=H[0]) / SICMP(type=3, code=3) / SIP(query)))
    assert svc.process(err, False, None, 0.0) == (Verdict(Action.DROP, "icmp_unrelated"), None)
    _, st = svc.process(parse(query), True, None, 0.0)
    assert svc.process(err, False, st, 1.0) == (FORWARD, st)
    _, st = svc.process(parse(bytes(SIP(src=H[0], dst=H[1]) / SUDP(sport=5000, dport=53)
                                    / Raw(b"SECRET-TOKEN"))), True, st, 1.0)
    assert st.action == FlowAction.BLOCK
    assert svc.process(err, False, st, 2.0) == (Verdict(Action.DROP, "blocked"), st)


def test_after_a_block_every_packet_is_a_plain_drop_and_after_allow_a_plain_forward():
    svc = Inspection(rules=RULES)
    _, st = send(svc, None, b"SECRET-TOKEN")
    v, st = send(svc, st, b"more")
    assert v == Verdict(Action.DROP, "blocked")
    svc = Inspection(rules=RULES, inspect_limit=10)
    _, st = send(svc, None, b"a" * 20)
    _, st = send(svc, st, b"b" * 20, forward=False)
    assert st.action == FlowAction.ALLOW
    v, st = send(svc, st, b"c" * 20)
    assert v == FORWARD


def test_an_ack_number_without_the_ack_flag_is_not_taken():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"0123456789")], forward=False)
    _, st = svc.process(seg(ISN_C + 1, b"", flags="P", ack=ISN_S + 1 + 10), True, st, 0.0)
    assert st.streams[1].acked == ISN_S + 1 and bytes(st.streams[1].history) == b"0123456789"
    _, st = svc.process(seg(ISN_C + 1, b"", flags="A", ack=ISN_S + 1 + 10), True, st, 0.0)
    assert st.streams[1].acked == ISN_S + 11 and not st.streams[1].history


def test_a_segment_without_data_or_syn_is_not_checksum_checked():
    """Nothing of it is scanned, so its checksum is the receiving host's
    business; a bad one on a data segment is dropped (control)."""
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    v, st = svc.process(seg(ISN_C + 1, b"", flags="A", ack=ISN_S + 1, chksum=0x1234), True, st, 0.0)
    assert v.action == Action.FORWARD
    v, st = svc.process(seg(ISN_C + 1, b"x", flags="PA", ack=ISN_S + 1, chksum=0x1234), True, st, 0.0)
    assert v.reason == "bad_checksum"


# --- the mirrored state, field by field ---------------------------------------------

import struct  # noqa: E402

HEAD, DIR = struct.Struct("!BBBBBQQ"), struct.Struct("!BIIQH")


def state_bytes(version=1, action=0, app=b"http", matched=b"", pp=2, nbytes=100, pkts=5,
                dirs=((1, 2000, 1990, 40, b"RET-"), (1, 9000, 9000, 60, b""))):
    out = HEAD.pack(version, action, len(app), len(matched), pp, nbytes, pkts)
    out += b"".join(DIR.pack(s, n, a, sc, len(t)) for s, n, a, sc, t in dirs)
    return out + app + matched + dirs[0][4] + dirs[1][4]


def test_a_mirrored_state_decodes_field_for_field_at_the_edges_of_its_ranges():
    svc = Inspection(rules=RULES)                                          # keep: 11 bytes
    st = svc.decode_state(state_bytes())
    assert (st.action, st.app, st.matched, st.payload_packets, st.bytes, st.packets) == (
        FlowAction.INSPECT, "http", "", 2, 100, 5)
    assert [(s.synced, s.nxt, s.acked, s.scanned, s.tail, s.recovering) for s in st.streams] == [
        (True, 2000, 1990, 40, b"RET-", True), (True, 9000, 9000, 60, b"", True)]
    edge = state_bytes(action=2, matched=b"exfil", dirs=((1, 200000, 200000 - HISTORY, 100, b"x" * 11),
                                                        (0, 0, 0, 0, b"")))
    st = svc.decode_state(edge)
    assert st.action == FlowAction.BLOCK and st.matched == "exfil" and svc.encode_state(st) == edge
    assert st.streams[1].synced is False
    bare = state_bytes(app=b"", dirs=((0, 0, 0, 0, b""), (0, 0, 0, 0, b"")))
    assert len(bare) == HEAD.size + 2 * DIR.size and svc.decode_state(bare).app == ""


@pytest.mark.parametrize("data,message", [
    (state_bytes(app=b"", dirs=((0, 0, 0, 0, b""), (0, 0, 0, 0, b"")))[:-1], "inspection state truncated"),
    (state_bytes(version=2), "inspection state version 2, not 1"),
    (state_bytes(version=0), "inspection state version 0, not 1"),
    (state_bytes() + b"x", "inspection state length mismatch"),
    (state_bytes()[:-1], "inspection state length mismatch"),
    (state_bytes(dirs=((2, 2000, 1990, 40, b""), (1, 9000, 9000, 60, b""))), "inspection stream state out of range"),
    (state_bytes(dirs=((1, 2000, 1990, 40, b"x" * 12), (1, 9000, 9000, 60, b""))),
     "inspection stream state out of range"),
    (state_bytes(dirs=((1, 2000, 1990, 101, b""), (1, 9000, 9000, 60, b""))), "inspection stream state out of range"),
    (state_bytes(dirs=((1, 2000, 1990, 40, b""), (1, 9000, 9000, 101, b""))), "inspection stream state out of range"),
    (state_bytes(dirs=((1, 2000, 1990, 40, b""), (0, 5, 0, 0, b""))), "inspection stream position without a start"),
    (state_bytes(dirs=((1, 2000, 1990, 40, b""), (0, 0, 5, 0, b""))), "inspection stream position without a start"),
    (state_bytes(dirs=((1, 200000, 200000 - HISTORY - 1, 40, b""), (1, 9000, 9000, 60, b""))),
     "inspection stream acknowledged too far behind"),
])
def test_a_mirrored_state_out_of_range_is_refused_saying_why(data, message):
    with pytest.raises(ValueError) as err:
        Inspection(rules=RULES).decode_state(data)
    assert str(err.value) == message


def test_the_encoded_state_carries_every_field():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"GET /x SECRET-")])
    data = svc.encode_state(st)
    version, action, la, lm, pp, nbytes, pkts = HEAD.unpack_from(data)
    assert (version, action, la, lm, pp, nbytes, pkts) == (1, 0, 4, 0, 1, 14, 3)
    d0 = DIR.unpack_from(data, HEAD.size)
    assert d0 == (1, ISN_C + 15, ISN_C + 1, 14, 11)
    assert data.endswith(b"http" + st.streams[0].tail) and st.streams[0].tail == b"T /x SECRET-"[-11:]
    st.payload_packets = 300
    assert HEAD.unpack_from(svc.encode_state(st))[4] == 255                 # a counter capped at one byte


def test_a_new_flows_first_packet_is_mirrored_even_without_payload():
    for svc in (Inspection(), Inspection(rules=RULES)):
        v, st = svc.process(parse(bytes(SIP(src=H[0], dst=H[1]) / SUDP(sport=5000, dport=53))), True, None, 0.0)
        assert v == Verdict(Action.FORWARD, mirror=True, timeout=600.0) and st.packets == 1


def test_a_limit_of_zero_bytes_inspects_nothing_but_mirrors_the_new_flow():
    svc = Inspection(rules=RULES, inspect_limit=0)
    v, st = svc.process(seg(ISN_C + 1, b"SECRET-TOKEN"), True, None, 0.0)
    assert v == Verdict(Action.FORWARD, mirror=True, timeout=600.0) and st.streams[0].scanned == 0


def test_a_direction_stops_being_scanned_at_exactly_its_limit():
    svc = Inspection(rules=RULES, inspect_limit=100)
    st = handshake(svc)
    st, _, vs = run(svc, st, [(0, b"a" * 94 + b"SECRET"), (100, b"-TOKEN")])
    assert st.streams[0].scanned == 100 and vs[1] == FORWARD
    st, _, vs = run(svc, st, [(106, b"SECRET-TOKEN")])
    assert vs[0] == FORWARD


def test_a_promoted_state_recovers_for_exactly_recovery_seconds_after_its_first_packet():
    primary, promoted = Inspection(rules=RULES), Inspection(rules=RULES)
    st = handshake(primary)
    st, _, _ = run(primary, st, [(0, b"a" * 100)], forward=False)
    mirrored = primary.encode_state(st)
    for at, recovering in ((1.0 + RECOVERY, True), (1.0 + RECOVERY + 0.001, False)):
        carried = promoted.decode_state(mirrored)
        _, carried = promoted.process(seg(ISN_S + 101, b"b" * 10, forward=False), False, carried, 1.0)
        v, carried = promoted.process(seg(ISN_S + 501, b"c" * 10, forward=False), False, carried, at)
        assert (v.action == Action.FORWARD) is recovering
        assert carried.streams[1].recovering is recovering


def test_an_acknowledgement_alone_is_not_mirrored():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"hello")])
    v, st = svc.process(seg(ISN_S + 1, flags="A", forward=False, ack=ISN_C + 6), False, st, 0.0)
    assert v == FORWARD and st.streams[0].acked == ISN_C + 6


def test_payload_packets_and_scanned_bytes_are_counted_one_by_one():
    svc = Inspection(rules=RULES)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"z" * 10), (10, b"z" * 20)])
    assert (st.payload_packets, st.streams[0].scanned, st.bytes, st.app) == (2, 30, 30, "inspecting")
    st, _, _ = run(svc, st, [(30, b"z")])
    assert (st.payload_packets, st.app) == (3, "unknown")


def test_a_new_flow_without_rules_is_mirrored_before_its_app_is_known():
    v, st = Inspection().process(parse(tcp(flags="PA", seq=5, payload=b"zzz")), True, None, 0.0)
    assert v == Verdict(Action.FORWARD, mirror=True, timeout=600.0) and st.app == "inspecting"


def test_one_byte_patterns_need_no_carry_over():
    svc = Inspection(rules=[{"name": "bang", "pattern": "!"}])
    _, st = send(svc, None, b"abc")
    assert st.streams[0].tail == b"" and svc.decode_state(svc.encode_state(st)).streams[0].tail == b""
    v, st = send(svc, st, b"x!")
    assert v.reason == "blocked"


def test_the_fast_path_of_an_allowed_flow_counts_its_payload_and_declines_a_bad_header():
    import copy

    svc = Inspection()
    _, st = send(svc, None, b"GET / HTTP/1.1\r\n")
    assert st.action == FlowAction.ALLOW and (st.packets, st.bytes) == (1, 16)
    dns = bytes(SIP(src=H[0], dst=H[1]) / SUDP(sport=5000, dport=53) / Raw(b"q" * 10))
    assert svc.fast(st, True, dns, 17, 20, len(dns)) and (st.packets, st.bytes) == (2, 26)
    seg_ = bytes(SIP(src=H[0], dst=H[1]) / STCP(sport=40000, dport=80, flags="A", seq=5) / Raw(b"d" * 7))
    assert svc.fast(st, True, seg_, 6, 20, len(seg_)) and (st.packets, st.bytes) == (3, 33)
    before = copy.deepcopy(st)
    long_header = bytearray(seg_)
    long_header[32] = 0xF0                                          # 60 bytes of header in 47
    assert not svc.fast(st, True, bytes(long_header), 6, 20, len(long_header))
    assert not svc.fast(st, True, seg_[:39], 6, 20, 39)             # not even a TCP header
    assert (st.packets, st.bytes) == (before.packets, before.bytes)


def test_the_fast_path_takes_acknowledgements_only_for_the_other_inspected_direction_with_the_ack_flag():
    import copy

    svc = Inspection(rules=RULES, inspect_limit=100)
    st = handshake(svc)
    st, _, _ = run(svc, st, [(0, b"s" * 150)], forward=False)                 # the server's direction done
    st, _, _ = run(svc, st, [(0, b"c" * 40)])                                 # the client's still inspected
    ack = bytes(SIP(src=H[1], dst=H[0]) / STCP(sport=80, dport=40000, flags="A", seq=ISN_S + 151,
                                              ack=ISN_C + 1 + 40))
    got = copy.deepcopy(st)
    assert svc.fast(got, False, ack, 6, 20, len(ack))
    assert got.streams[0].acked == ISN_C + 41 and got.streams[1] == st.streams[1]
    no_flag = bytes(SIP(src=H[1], dst=H[0]) / STCP(sport=80, dport=40000, flags="P", seq=ISN_S + 151,
                                                  ack=ISN_C + 1 + 40))
    got = copy.deepcopy(st)
    assert svc.fast(got, False, no_flag, 6, 20, len(no_flag)) and got.streams == st.streams
    allowed = Inspection()
    _, ast = send(allowed, None, b"GET / HTTP/1.1\r\n")
    _, ast = send(allowed, ast, b"HTTP/1.1 200 OK\r\n", forward=False)
    before = copy.deepcopy(ast.streams)
    data = bytes(SIP(src=H[0], dst=H[1]) / STCP(sport=40000, dport=80, flags="A", seq=5, ack=7777))
    assert allowed.fast(ast, True, data, 6, 20, len(data)) and ast.streams == before


def test_a_state_with_carry_over_in_both_directions_round_trips():
    svc = Inspection(rules=RULES)
    data = state_bytes(dirs=((1, 2000, 1990, 40, b"RET-"), (1, 9000, 8990, 60, b"SECR")))
    st = svc.decode_state(data)
    assert [s.tail for s in st.streams] == [b"RET-", b"SECR"] and svc.encode_state(st) == data


def test_without_rules_a_known_flows_unclassified_payload_is_not_mirrored():
    svc = Inspection()
    _, st = send(svc, None, b"zzz")
    v, st = send(svc, st, b"zzz")
    assert v == FORWARD and st.app == "inspecting"


def test_the_fast_path_takes_a_32_bit_acknowledgement_number():
    import copy

    svc = Inspection(rules=RULES, inspect_limit=100)
    big = 0x7F000000
    _, st = svc.process(seg(big, flags="S"), True, None, 0.0)
    _, st = svc.process(seg(ISN_S, flags="SA", forward=False, ack=big + 1), False, st, 0.0)
    v, st = svc.process(seg(big + 1, b"c" * 40), True, st, 0.0)
    st, _, _ = run(svc, st, [(0, b"s" * 150)], forward=False)
    ack = bytes(SIP(src=H[1], dst=H[0]) / STCP(sport=80, dport=40000, flags="A", seq=ISN_S + 151, ack=big + 41))
    got = copy.deepcopy(st)
    assert svc.fast(got, False, ack, 6, 20, len(ack)) and got.streams[0].acked == big + 41
