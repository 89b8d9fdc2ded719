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
