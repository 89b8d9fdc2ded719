"""Flow records on the sync wire: every shape round-trips, damage is refused."""

from __future__ import annotations

import pytest

from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate

V4 = (1, 12345, 17, b"\x0a\x01\x00\x0a", 20000, b"\x0a\x02\x00\x0a", 53)
V6 = (1, 5, 6, bytes(16), 1, bytes(15) + b"\x01", 2)


@pytest.mark.parametrize("update", [
    FlowUpdate(V4, 7, b"s" * 20, False, "egress", "ingress", 30.0),   # the one-unpack path
    FlowUpdate(V6, 3, b"", False, None, "aa", 1.5),
    FlowUpdate(V4, 9, deleted=True),
    FlowUpdate(V6, 2, deleted=True),
])
def test_flow_records_round_trip(update):
    assert sw.read_flow(sw.flow_record(update)) == update


def test_damaged_upserts_are_refused():
    rec = sw.flow_record(FlowUpdate(V4, 7, b"s" * 20, False, "egress", "ingress", 30.0))
    for value in (rec.value[:-1], rec.value + b"x", rec.value[:30]):
        with pytest.raises(sw.SyncError, match="malformed"):
            sw.read_flow(sw.Record(rec.type, value))


def test_a_key_is_bound_to_its_senders_and_a_rotation_keeps_the_binding():
    ring = sw.Keyring({1: b"k" * 16}, 1, senders=[sw.node_id("ba")])
    ring.add(2, b"l" * 16)
    ring.use(2)
    ok = sw.encode(ring, sw.node_id("ba"), sw.node_id("bb"), 1, 0, 1, 0, [])
    assert sw.decode(ring, ok, sw.node_id("bb")).key_id == 2
    other = sw.encode(ring, sw.node_id("bc"), sw.node_id("bb"), 1, 0, 1, 0, [])
    with pytest.raises(sw.SyncError, match="key_not_for_sender"):
        sw.decode(ring, other, sw.node_id("bb"))


def test_pair_keys_sign_one_pair_only():
    """The master's holder talks to each node under their pair key; a node
    holding one pair key cannot sign for another pair."""
    ctl, ba, bb = (sw.node_id(n) for n in ("ctl", "ba", "bb"))
    master = sw.Keyring({1: b"m" * 32}, 1, pairwise=True)
    ba_ring = sw.Keyring({1: sw.pair_key(b"m" * 32, ctl, ba)}, 1)
    to_ba = sw.encode(master, ctl, ba, 1, 0, 1, 0, [])
    assert sw.decode(ba_ring, to_ba, ba).sender == ctl
    assert sw.decode(master, sw.encode(ba_ring, ba, ctl, 1, 0, 1, 0, []), ctl).sender == ba
    as_ctl_to_bb = sw.encode(ba_ring, ctl, bb, 1, 0, 1, 0, [])
    with pytest.raises(sw.SyncError, match="bad_mac"):
        sw.decode(sw.Keyring({1: sw.pair_key(b"m" * 32, ctl, bb)}, 1), as_ctl_to_bb, bb)
    as_bb_to_ctl = sw.encode(ba_ring, bb, ctl, 1, 0, 1, 0, [])
    with pytest.raises(sw.SyncError, match="bad_mac"):
        sw.decode(master, as_bb_to_ctl, ctl)
