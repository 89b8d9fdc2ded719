"""The resend buffer: what went to a hop the new map declares dead goes again
to the new primary, and nothing else."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from dataplane.core import header as wire
from dataplane.core.node import EGRESS, INGRESS
from dataplane.core.resend import ResendBuffer
from dataplane.core.servicemap import InstanceState, ServiceMap
from tests.conftest import codes_led_by, pair_map, udp


def test_packets_to_a_hop_declared_dead_go_to_the_new_primary():
    old = pair_map()
    code = codes_led_by(old, "ba")[0]
    new = old.copy()
    new.set_state("ba", InstanceState.DEAD)
    buf = ResendBuffer(window=0.030)
    pkt = wire.pack(1, 1, code, 1, old.epoch) + udp(payload=b"lost")
    buf.record(0.000, "ba", pkt + b"-too-old")
    buf.record(0.080, "ba", pkt)
    buf.record(0.085, "egress", pkt)             # alive: stays where it went
    out = buf.reroute(old, new, 0.100)
    assert [s.to for s in out] == ["bb"] and buf.resent == 1
    h = wire.decode(out[0].data)
    assert h.epoch == new.epoch and h.flags & wire.Flags.REROUTED and h.code == code
    assert out[0].data[20:] == pkt[20:]
    assert buf.reroute(old, new, 0.101) == []   # the same map again: nothing is sent twice
    assert [hop for _, hop, _ in buf.sent] == ["egress"]


def test_nothing_moves_when_no_hop_dies_or_no_instance_is_left():
    old = pair_map()
    code = codes_led_by(old, "ba")[0]
    buf = ResendBuffer(window=0.030)
    buf.record(0.0, "ba", wire.pack(1, 1, code, 1, old.epoch) + udp())
    joined = old.copy()
    joined.set_state("bb", InstanceState.DRAINING)  # a change, but ba lives
    assert buf.reroute(old, joined, 0.01) == []
    gone = old.copy()
    gone.set_state("ba", InstanceState.DEAD)
    gone.set_state("bb", InstanceState.DEAD)
    assert buf.reroute(old, gone, 0.01) == [] and buf.unroutable == 1


def test_what_cannot_be_decoded_again_is_counted_not_raised():
    """A packet kept with TTL 0 (what a TTL-1 packet left as before the
    node dropped those) or damaged must not make the map install raise
    (issue #14, finding 9)."""
    old = pair_map()
    code = codes_led_by(old, "ba")[0]
    new = old.copy()
    new.set_state("ba", InstanceState.DEAD)
    buf = ResendBuffer(window=0.030)
    buf.record(0.0, "ba", wire.pack(1, 1, code, 1, old.epoch, ttl=0) + udp())
    buf.record(0.0, "ba", b"\x10\x01")
    buf.record(0.0, "ba", wire.pack(1, 1, code, 1, old.epoch, ttl=1) + udp())
    out = buf.reroute(old, new, 0.01)
    assert [(s.to, wire.decode(s.data).ttl) for s in out] == [("bb", 1)]
    assert buf.bad == 2 and buf.resent == 1


def _map_of(states: dict[str, InstanceState], with_b: bool) -> ServiceMap:
    if not with_b:                      # a map in which service B is gone altogether
        m = ServiceMap(buckets=1024)
        m.add_service(INGRESS, [INGRESS])
        m.add_service(EGRESS, [EGRESS])
        return m
    m = pair_map()
    for name, state in states.items():
        m.set_state(name, state)
    return m


_PACKETS = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda code, ttl, words, rest: wire.pack(1, 1, code, 1, 1, ttl=ttl, words=words) + rest,
              st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40)))


@settings(max_examples=300, deadline=None)
@given(sent=st.lists(st.tuples(st.sampled_from(["ba", "bb", INGRESS, EGRESS, "zz"]), _PACKETS), max_size=8),
       old_states=st.dictionaries(st.sampled_from(["ba", "bb"]), st.sampled_from(list(InstanceState))),
       new_states=st.dictionaries(st.sampled_from(["ba", "bb"]), st.sampled_from(list(InstanceState))),
       new_has_b=st.booleans())
def test_reroute_never_raises(sent, old_states, new_states, new_has_b):
    old, new = _map_of(old_states, True), _map_of(new_states, new_has_b)
    buf = ResendBuffer(window=1.0)
    for hop, data in sent:
        buf.record(0.0, hop, data)
    out = buf.reroute(old, new, 0.5)
    assert all(new.is_alive(s.to) for s in out)
    assert buf.resent + buf.unroutable + buf.bad + len(buf.sent) == len(sent)


def test_a_resent_header_keeps_every_field_but_epoch_and_the_rerouted_flag():
    old = pair_map()
    code = codes_led_by(old, "ba")[0]
    new = old.copy()
    new.set_state("ba", InstanceState.DEAD)
    buf = ResendBuffer(window=1.0)
    head = wire.pack(3, 2, code, 7, old.epoch, flags=int(wire.Flags.REVERSE), ttl=9,
                     next_proto=int(wire.NextProto.IPV6), words=6)
    kept = head + b"\x00" * 4 + b"inner"                          # one word of options
    buf.record(1.0, "ba", kept)                                 # exactly `window` old: still kept
    (out,) = buf.reroute(old, new, 2.0)
    h = wire.decode(out.data)
    assert (h.chain, h.index, h.code, h.client, h.epoch) == (3, 2, code, 7, new.epoch)
    assert h.flags == wire.Flags.REVERSE | wire.Flags.REROUTED
    assert (h.ttl, h.next_proto, h.length) == (9, wire.NextProto.IPV6, 24)
    assert out.data[20:] == kept[20:] and out.to == "bb"


def test_unroutable_packets_are_counted_each_and_the_rest_still_go():
    """Service B is gone from the new map (its packets have nowhere to go)
    while A lost aa to ab: B's packets are counted, A's resent, in one call,
    and the counters add up over calls."""
    from dataplane.core.servicemap import ServiceMap
    from tests.test_node import lab_map

    old = lab_map()
    new = ServiceMap(buckets=old.buckets)
    for svc, names in ((INGRESS, [INGRESS]), ("A", ["aa", "ab"]), (EGRESS, [EGRESS])):
        new.add_service(svc, names)
    new.set_state("aa", InstanceState.DEAD)
    code = codes_led_by(old, "aa", service="A")[0]
    buf = ResendBuffer(window=1.0)
    for hop in ("ba", "ba", "aa"):
        buf.record(0.0, hop, wire.pack(1, 1, code, 1, old.epoch) + udp())
    out = buf.reroute(old, new, 0.5)
    assert [s.to for s in out] == ["ab"] and buf.unroutable == 2 and buf.resent == 1
    buf.record(0.6, "aa", wire.pack(1, 1, code, 1, old.epoch) + udp())
    assert [s.to for s in buf.reroute(old, new, 0.7)] == ["ab"] and buf.resent == 2
