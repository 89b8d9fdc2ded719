"""The simulated network: seeded loss, duplication, reordering, partitions."""

from __future__ import annotations

import random

from dataplane.sim.clock import Clock
from dataplane.sim.network import FABRIC, SYNC, LinkFaults, Network


def _net(seed: int, faults: dict[str, LinkFaults]) -> tuple[Clock, Network, list]:
    clock, got = Clock(), []
    net = Network(clock, random.Random(seed), lambda dst, src, kind, data: got.append((dst, src, kind, data)),
                  faults)
    return clock, net, got


def _run(seed: int, faults: LinkFaults, n: int = 500) -> list:
    clock, net, got = _net(seed, {FABRIC: faults})
    for i in range(n):
        net.send("a", "b", FABRIC, i.to_bytes(2, "big"))
    clock.run_until(10.0)
    return [int.from_bytes(d, "big") for *_, d in got]


def test_clean_link_delivers_everything_in_order():
    assert _run(1, LinkFaults()) == list(range(500))


def test_faults_lose_duplicate_and_reorder_and_the_seed_replays_them():
    out = _run(7, LinkFaults(loss=0.1, duplicate=0.1, jitter=0.01))
    assert out == _run(7, LinkFaults(loss=0.1, duplicate=0.1, jitter=0.01))
    assert out != _run(8, LinkFaults(loss=0.1, duplicate=0.1, jitter=0.01))
    assert 350 < len(set(out)) < 490          # lost some
    assert len(out) > len(set(out))           # duplicated some
    assert out != sorted(out)                 # reordered some


def test_partition_cuts_both_directions_and_datagrams_in_flight():
    clock, net, got = _net(1, {FABRIC: LinkFaults(delay=0.1)})
    net.send("a", "b", FABRIC, b"in flight")
    net.partition("b")
    net.send("b", "a", FABRIC, b"out")
    net.send("a", "c", FABRIC, b"other")
    clock.run_until(1.0)
    assert [d for *_, d in got] == [b"other"]
    net.heal("b")
    net.send("b", "a", FABRIC, b"healed")
    clock.run_until(2.0)
    assert got[-1] == ("a", "b", FABRIC, b"healed")


def test_pair_impairment_is_one_link_of_one_kind():
    clock, net, got = _net(1, {})
    net.impair("a", "b", SYNC, LinkFaults(loss=1.0))
    net.send("b", "a", SYNC, b"lost")
    net.send("a", "b", FABRIC, b"fabric")
    net.send("a", "c", SYNC, b"other")
    net.impair("a", "b", SYNC, None)
    net.send("a", "b", SYNC, b"restored")
    clock.run_until(1.0)
    assert [d for *_, d in got] == [b"fabric", b"other", b"restored"]
