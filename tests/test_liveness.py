"""Failure detection: 10 ms x 5 by default, hold-down against flapping."""

from __future__ import annotations

import pytest

from dataplane.core.liveness import Declared, FailureDetector, Health


def test_declared_dead_after_misses_and_not_before():
    fd = FailureDetector()
    assert fd.heard("ba", 0.0)[0].health == Health.ALIVE
    for t in range(1, 10):
        fd.heard("ba", t * 0.010)
    assert fd.tick(0.090 + 0.049) == []
    dead = fd.tick(0.090 + 0.051)
    assert len(dead) == 1 and dead[0].health == Health.DEAD and dead[0].last_heard == pytest.approx(0.09)
    assert fd.tick(0.5) == []                     # declared once


def test_holddown_keeps_a_flapping_peer_dead():
    fd = FailureDetector(holddown=1.0)
    fd.heard("ba", 0.0)
    fd.tick(0.1)
    assert fd.health("ba") == Health.DEAD
    t = 0.2
    while t < 1.19:                               # heard steadily, but less than the hold-down
        assert fd.heard("ba", t) == []
        t += 0.010
    assert fd.health("ba") == Health.DEAD
    fd.tick(1.3)                                  # a gap restarts the steady run
    t = 1.5
    revived = []
    while t < 2.6 and not revived:
        revived = fd.heard("ba", t)
        t += 0.010
    assert revived and revived[0].health == Health.ALIVE and revived[0].at >= 2.5


def test_watch_counts_silence_from_now():
    fd = FailureDetector(interval=0.01, misses=3)
    fd.watch("bb", 1.0)
    assert fd.tick(1.02) == [] and fd.tick(1.031)[0].peer == "bb"


def test_bad_settings():
    with pytest.raises(ValueError):
        FailureDetector(interval=0)


def test_a_forgotten_peer_is_unknown_and_never_declared():
    fd = FailureDetector(interval=0.01, misses=3)
    fd.watch("bb", 1.0)
    fd.watch("bc", 1.0)
    fd.forget("bb")
    fd.forget("never-watched")                    # forgetting a stranger is no error
    assert fd.health("bb") == Health.UNKNOWN and fd.health("bc") == Health.ALIVE
    assert [d.peer for d in fd.tick(2.0)] == ["bc"]
    # heard again later, it is new: declared alive at once, no hold-down
    assert fd.heard("bb", 2.0) == [Declared("bb", Health.ALIVE, 2.0, 2.0)]


def test_dead_strictly_after_the_timeout_and_declared_at_the_tick():
    fd = FailureDetector(interval=0.5, misses=2)                 # timeout 1.0 s
    fd.heard("ba", 1.0)
    assert fd.tick(2.0) == []                                    # silent for exactly the timeout
    assert fd.tick(2.5) == [Declared("ba", Health.DEAD, 2.5, 1.0)]


def test_settings_at_their_limits_are_taken_and_past_them_refused_by_name():
    fd = FailureDetector()                                        # the documented defaults
    assert (fd.interval, fd.misses, fd.holddown, fd.timeout) == (0.010, 5, 1.0, 0.05)
    FailureDetector(interval=0.001, misses=1, holddown=0)
    for bad in ({"interval": 0}, {"misses": 0}, {"holddown": -0.5}):
        with pytest.raises(ValueError) as err:
            FailureDetector(**bad)
        assert str(err.value) == "interval > 0, misses >= 1 and holddown >= 0 are required"


def test_a_gap_of_exactly_the_timeout_keeps_the_steady_run_and_the_hold_down_is_inclusive():
    fd = FailureDetector(interval=0.5, misses=2, holddown=2.0)   # timeout 1.0 s
    fd.heard("ba", 0.0)
    assert fd.tick(1.5)[0].health == Health.DEAD
    assert fd.heard("ba", 1.5) == []                            # the steady run starts here
    assert fd.heard("ba", 2.5) == []                            # 1.0 s gap: still the same run
    assert fd.heard("ba", 3.5) == [Declared("ba", Health.ALIVE, 3.5, 3.5)]   # 2.0 s steady
    assert fd.health("ba") == Health.ALIVE
