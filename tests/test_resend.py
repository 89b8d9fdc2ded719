"""The resend buffer: what went to a hop the new map declares dead goes again
to the new primary, and nothing else."""

from __future__ import annotations

from dataplane.core import header as wire
from dataplane.core.resend import ResendBuffer
from dataplane.core.servicemap import InstanceState
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
