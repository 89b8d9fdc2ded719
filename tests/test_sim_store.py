"""The simulator's shared map store: etcd's compare-and-swap on one key, revisions as fencing tokens."""

from __future__ import annotations

from dataplane.core.mapstore import MAP_KEY, Event, Fence, Follower, Install, Read, cas
from dataplane.sim.store import SimStore


def test_the_first_map_needs_no_key_and_every_write_gets_the_next_revision():
    s = SimStore()
    assert s.read() == Read(None, 0)
    assert not s.propose(b"m1", 5).won                       # computed from a map that is not there
    r = s.propose(b"m1", 0)
    assert r.won and r.stored.value == b"m1" and r.stored.revision == 1
    r = s.propose(b"m2", 1)
    assert r.won and r.stored.revision == 2
    assert s.read().stored.value == b"m2" and s.read().header_revision == 2


def test_of_two_proposals_computed_from_one_revision_exactly_one_wins_and_the_loser_learns_the_winner():
    s = SimStore()
    s.propose(b"m1", 0)
    a, b = s.propose(b"from-a", 1), s.propose(b"from-b", 1)
    assert a.won and not b.won
    assert b.stored.value == b"from-a" and b.stored.revision == 2   # the failure branch reads it
    assert s.refused == 1 and [w.value for w in s.writes] == [b"m1", b"from-a"]


def test_a_stale_transaction_is_refused_whatever_it_carries():
    s = SimStore()
    for i in range(3):
        s.propose(b"m%d" % i, i)
    r = s.txn(cas(MAP_KEY, b"late", 1))                          # a controller that woke up at revision 1
    assert not r.won and r.stored.revision == 3 and s.read().stored.value == b"m2"


def test_watchers_hear_every_write_in_order_and_a_follower_installs_each_once():
    s = SimStore()
    heard = []
    s.watchers.append(heard.append)
    f = Follower()
    f.start()
    f.on(s.read())
    for i in range(3):
        s.propose(b"m%d" % i, i)
    s.propose(b"lost", 1)                                        # refused: no event
    assert [(w.value, w.revision) for w in heard] == [(b"m0", 1), (b"m1", 2), (b"m2", 3)]
    installs = [a for w in heard for a in f.on(Event(w.value, w.revision)) if isinstance(a, Install)]
    assert [i.stored.revision for i in installs] == [1, 2, 3]
    assert f.on(Event(heard[0].value, heard[0].revision)) == []  # replayed: refused
    fence = Fence()
    assert fence.admit(3) and not fence.admit(2)


def test_without_the_comparison_every_write_wins_the_split_brain_control():
    s = SimStore(compare=False)
    s.propose(b"m1", 0)
    a, b = s.propose(b"from-a", 1), s.propose(b"from-b", 1)
    assert a.won and b.won and s.refused == 0
    assert s.read().stored.value == b"from-b"                    # the last writer, over the first
