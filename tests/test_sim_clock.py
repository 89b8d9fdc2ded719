"""The simulated clock fires timers in time order, ties in scheduling order."""

from __future__ import annotations

from dataplane.sim.clock import Clock


def test_timers_fire_in_time_then_scheduling_order():
    c, seen = Clock(), []
    c.at(0.3, lambda: seen.append(("c", c.now)))
    c.at(0.1, lambda: seen.append(("a", c.now)))
    c.at(0.1, lambda: seen.append(("b", c.now)))
    c.run_until(0.2)
    assert seen == [("a", 0.1), ("b", 0.1)]
    assert c.now == 0.2 and len(c) == 1
    c.run_until(1.0)
    assert seen[-1] == ("c", 0.3) and c.now == 1.0


def test_a_timer_scheduled_in_the_past_fires_now_and_timers_may_chain():
    c, seen = Clock(), []
    c.run_until(1.0)

    def first() -> None:
        seen.append(c.now)
        c.after(0.5, lambda: seen.append(c.now))

    c.at(0.2, first)
    c.run_until(2.0)
    assert seen == [1.0, 1.5]
