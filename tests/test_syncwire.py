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


def test_an_upsert_cut_at_every_byte_is_refused_even_inside_a_known_hop_name():
    """The hops are read inline against the cache of names: a name cut
    short must not be taken for a cached one that it is a prefix of."""
    whole = FlowUpdate(V4, 7, b"s" * 3, False, "egress", "ingress", 30.0)
    sw.read_flow(sw.flow_record(FlowUpdate(V4, 1, b"", False, "egr", "ingr", 1.0)))  # cache the prefixes
    rec = sw.flow_record(whole)
    assert sw.read_flow(rec) == whole
    for n in range(len(rec.value)):
        with pytest.raises(sw.SyncError, match="malformed"):
            sw.read_flow(sw.Record(rec.type, rec.value[:n]))


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


def test_keyring_phases_accept_old_and_new_then_send_new_then_refuse_the_retired():
    """A rotation's three phases on one receiver: after `add` it accepts
    the old and the new key id (still signing with the old); after `use` it
    signs with the new; after `retire` a datagram under the old id is
    refused as `unknown_key`. Adding the same key again is a no-op (a
    rerun of the install phase); another key under a held id is refused."""
    ba, bb = sw.node_id("ba"), sw.node_id("bb")
    old = sw.Keyring({1: b"o" * 32}, 1, senders=[ba, bb])
    ring = sw.Keyring({1: b"o" * 32}, 1, senders=[ba, bb])
    new = sw.Keyring({2: b"n" * 32}, 2)
    ring.add(2, b"n" * 32)
    ring.add(2, b"n" * 32)
    with pytest.raises(ValueError, match="key id 2 holds another key"):
        ring.add(2, b"x" * 32)
    for sender in (old, new):
        assert sw.decode(ring, sw.encode(sender, ba, bb, 1, 0, 1, 0, []), bb).sender == ba
    assert sw.decode(old, sw.encode(ring, bb, ba, 1, 0, 1, 0, []), ba).key_id == 1
    ring.use(2)
    assert sw.decode(new, sw.encode(ring, bb, ba, 1, 0, 1, 0, []), ba).key_id == 2
    ring.retire(1)
    with pytest.raises(sw.SyncError, match="unknown_key"):
        sw.decode(ring, sw.encode(old, ba, bb, 1, 0, 2, 0, []), bb)
    assert ring.senders[2] == frozenset({ba, bb})


def test_keyring_state_round_trips_keys_and_the_current_id():
    """What a forwarder persists (0600, in its run directory) so a restart
    comes back with the rotated keys: ids, keys and the id in use; the
    binding to senders and pairwise-ness stay the topology's."""
    ring = sw.Keyring({1: b"o" * 32}, 1, senders=[7], pairwise=True)
    ring.add(2, b"n" * 32)
    ring.use(2)
    fresh = sw.Keyring({1: b"o" * 32}, 1, senders=[7], pairwise=True)
    fresh.restore(ring.state())
    assert fresh.keys == ring.keys and fresh.current == 2 and fresh.senders[2] == frozenset({7})
    assert fresh.signing_key(1, 7) == ring.signing_key(1, 7)
    with pytest.raises(ValueError, match="current key id 3"):
        fresh.restore({"current": 3, "keys": {"1": "00" * 16}})


def _delete_value(family: int, key_bytes: int, tail: bytes = bytes(8)) -> bytes:
    """A FLOW_DELETE value: the key's head naming `family`, `key_bytes` of
    addresses and ports, then `tail` (the version)."""
    return sw._KEY_HEAD.pack(1, 5, 6, family) + bytes(key_bytes) + tail


@pytest.mark.parametrize("value,why", [
    (_delete_value(4, 0)[:9], "flow key"),                 # not even the key's head
    (_delete_value(5, 0, b""), "flow key family"),         # a head naming no family
    (_delete_value(5, 12), "flow key family"),             # as long as an IPv4 key
    (_delete_value(5, 36), "flow key family"),             # as long as an IPv6 key
    (_delete_value(6, 30, b""), "flow key"),               # an IPv6 key cut short
    (_delete_value(6, 36, b""), "delete record"),          # a whole IPv6 key, no version
])
def test_a_flow_key_cut_short_or_of_no_address_family_is_refused_and_said_why(value, why):
    with pytest.raises(sw.SyncError) as err:
        sw.read_flow(sw.Record(sw.RecordType.FLOW_DELETE, value))
    assert err.value.reason == "malformed" and str(err.value) == f"malformed: {why}"


def test_key_ids_are_0_to_255_and_keys_at_least_16_bytes():
    for kid in (0, 255):
        assert sw.Keyring({kid: b"k" * 16}, kid).current == kid
    for kid, key in ((256, b"k" * 32), (-1, b"k" * 32), (1, b"k" * 15)):
        with pytest.raises(ValueError) as err:
            sw.Keyring({kid: key}, kid)
        assert str(err.value) == f"key {kid}: ids are 0-255 and keys at least 16 bytes"


def test_keyring_misuse_is_refused_with_the_reason():
    ring = sw.Keyring({1: b"a" * 16, 2: b"b" * 16}, 1)
    cases = [
        (lambda: sw.Keyring({1: b"a" * 16}, 2), "current key id 2 not in keyring"),
        (lambda: ring.use(3), "no key 3"),
        (lambda: ring.retire(1), "cannot retire the key in use"),
        (lambda: ring.restore({"current": 1, "keys": "01ab"}),
         "a keyring state has 'current' (int) and 'keys' (id -> hex)"),
        (lambda: ring.restore({"current": "1", "keys": {"1": "61" * 16}}),
         "a keyring state has 'current' (int) and 'keys' (id -> hex)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == message
    assert ring.current == 1 and set(ring.keys) == {1, 2}


def test_retiring_a_key_the_ring_does_not_hold_changes_nothing():
    ring = sw.Keyring({1: b"a" * 16, 2: b"b" * 16}, 1)
    ring.retire(2)
    ring.retire(2)                                       # a rotation's phase 3 rerun
    ring.retire(7)
    assert set(ring.keys) == {1} and set(ring.senders) == {1}


def test_a_refusal_without_detail_is_named_by_its_reason_alone():
    err = sw.SyncError("truncated")
    assert str(err) == "truncated" and err.reason == "truncated"
    assert str(sw.SyncError("malformed", "hop")) == "malformed: hop"
