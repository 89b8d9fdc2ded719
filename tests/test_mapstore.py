"""The map store's pure decisions: fencing, compare-and-swap, watch resume."""

from __future__ import annotations

import pytest

from dataplane.core.mapstore import (BACKOFF_MAX, Broken, Compacted, DoRead, DoWatch, Event, Fence,
                                     Follower, Install, Pause, Read, Stored, cas, cas_result)


def test_fence_admits_only_newer_revisions():
    f = Fence()
    assert f.admit(5) and f.installed == 5
    assert not f.admit(5) and not f.admit(3) and f.installed == 5
    assert f.admit(6)


def test_cas_compares_the_revision_computed_from():
    t = cas("/amesh/x/map", b"m2", 7)
    assert t.expect == 7 and t.value == b"m2"
    assert cas("/k", b"m1", 0).expect == 0          # first map: the key must not exist
    with pytest.raises(ValueError):
        cas("/k", b"m", -1)


def test_cas_result_won_takes_the_header_revision_lost_takes_the_winner():
    t = cas("/k", b"mine", 7)
    assert cas_result(t, True, 8, None).stored == Stored(b"mine", 8)
    lost = cas_result(t, False, 8, Stored(b"theirs", 8))
    assert not lost.won and lost.stored == Stored(b"theirs", 8)


def test_start_without_a_map_reads_then_watches_after_the_read():
    f = Follower()
    assert f.start() == [DoRead(0)]
    assert f.on(Read(Stored(b"m", 4), 9)) == [Install(Stored(b"m", 4)), DoWatch(10, 0)]
    assert f.fence.installed == 4


def test_start_from_a_known_revision_watches_from_the_next():
    f = Follower()
    assert f.start(12) == [DoWatch(13, 0)]
    assert f.fence.installed == 12


def test_read_of_an_empty_store_installs_nothing():
    f = Follower()
    f.start()
    assert f.on(Read(None, 1)) == [DoWatch(2, 0)]


def test_events_install_in_order_and_stale_ones_are_refused():
    f = Follower()
    f.start(3)
    assert f.on(Event(b"a", 5)) == [Install(Stored(b"a", 5))]
    assert f.next_revision == 6
    assert f.on(Event(b"old", 5)) == []             # repeated after a resume
    assert f.on(Event(b"b", 7)) == [Install(Stored(b"b", 7))]
    assert f.counters["refused"] == 1 and f.counters["installs"] == 2


def test_a_delete_moves_the_revision_but_keeps_the_map():
    f = Follower()
    f.start(3)
    assert f.on(Event(None, 4)) == [] and f.next_revision == 5 and f.fence.installed == 3
    assert f.counters["deletes"] == 1


def test_broken_stream_resumes_after_the_last_seen_revision_on_the_next_endpoint():
    f = Follower(endpoints=3)
    f.start(3)
    f.on(Event(b"a", 8))
    assert f.on(Broken()) == [Pause(0.05), DoWatch(9, 1)]
    assert f.on(Broken()) == [Pause(0.1), DoWatch(9, 2)]   # backs off, rotates
    assert f.on(Broken()) == [Pause(0.2), DoWatch(9, 0)]
    assert f.on(Event(b"b", 9)) == [Install(Stored(b"b", 9))]
    assert f.on(Broken()) == [Pause(0.05), DoWatch(10, 1)]  # a good event reset the back-off


def test_back_off_is_capped():
    f = Follower()
    f.start(1)
    for _ in range(30):
        pause, _watch = f.on(Broken())
    assert pause == Pause(BACKOFF_MAX)


def test_a_broken_read_is_retried():
    f = Follower(endpoints=2)
    f.start()
    assert f.on(Broken()) == [Pause(0.05), DoRead(1)]


def test_compaction_re_reads_then_re_watches_and_never_goes_back():
    f = Follower()
    f.start(3)
    f.on(Event(b"a", 6))
    assert f.on(Compacted(20)) == [DoRead(0)]
    assert f.on(Read(Stored(b"z", 18), 25)) == [Install(Stored(b"z", 18)), DoWatch(26, 0)]
    f2 = Follower()
    f2.start(30)                                    # has a newer map than the store answers
    f2.on(Compacted(20))
    assert f2.on(Read(Stored(b"z", 18), 25)) == [DoWatch(26, 0)]
    assert f2.fence.installed == 30 and f2.counters["refused"] == 1


def test_answers_out_of_turn_are_refused_or_errors():
    f = Follower()
    f.start(3)
    with pytest.raises(ValueError):
        f.on(Read(None, 1))
    f2 = Follower()
    f2.start()
    assert f2.on(Event(b"x", 9)) == [] and f2.counters["refused"] == 1
    with pytest.raises(TypeError):
        f.on("junk")   # type: ignore[arg-type]
