"""Each invariant of the simulation checker fails on a history that breaks it."""

from __future__ import annotations

from dataplane.core.servicemap import InstanceState, ServiceMap
from dataplane.sim.checker import (Final, converged, epochs_grow, flows_survive, lost_counted,
                                   one_map_per_epoch, one_server_per_epoch, versions_grow)
from dataplane.sim.mesh import History
from dataplane.sim.workload import Conn, Outcome

KEY = (1, 0x1234, 6, b"\n\x01\x00\x0a", 4000, b"\n\x02\x00\x0a", 80)


def _conn(i: int, outcome: Outcome) -> Conn:
    return Conn(i, 6, "10.1.0.10", 4000 + i, "10.2.0.10", 80, 5, 0.0, outcome=outcome)


def test_flows_survive_flags_failed_running_and_misdelivered_but_not_exempt():
    conns = [_conn(0, Outcome.DONE), _conn(1, Outcome.FAILED), _conn(2, Outcome.RUNNING),
             _conn(3, Outcome.FAILED)]
    found = flows_survive(conns, [(1.0, "server", "no connection")], exempt={3})
    assert len(found) == 3
    assert "misdelivery" in found[0] and "conn 1 " in found[1] and "conn 2 " in found[2]
    assert flows_survive(conns[:1], [], set()) == []


def test_versions_grow_per_node_incarnation_and_flow():
    h = History()
    h.applies += [(0.1, "bb", 1, KEY, 1, False), (0.2, "bb", 1, KEY, 2, True),
                  (0.3, "bc", 1, KEY, 1, False), (0.4, "bb", 2, KEY, 1, False)]
    assert versions_grow(h) == []
    h.applies.append((0.5, "bb", 1, KEY, 1, False))   # the deleted flow comes back
    assert len(versions_grow(h)) == 1 and "after version 2" in versions_grow(h)[0]


def test_one_server_per_epoch():
    h = History()
    h.serves += [(0.1, "B", "ba", 1, 5, 0x1234, 7), (0.2, "B", "bb", 1, 6, 0x1234, 7),
                 (0.2, "A", "aa", 1, 6, 0x1234, 7)]
    assert one_server_per_epoch(h) == []
    h.serves.append((0.3, "B", "bc", 1, 6, 0x1234, 7))
    assert one_server_per_epoch(h) == ["service B conn 7 epoch 6 served by ['bb', 'bc']"]


def test_epochs_grow_within_an_incarnation():
    h = History()
    h.epochs += [(0.0, "ba", 1, 5), (0.1, "ba", 1, 7), (0.2, "ba", 2, 3)]
    assert epochs_grow(h) == []
    h.epochs.append((0.3, "ba", 1, 6))
    assert epochs_grow(h) == ["t=0.300 ba went from epoch 7 back to 6"]


def test_one_map_per_epoch_across_every_node():
    h = History()
    m = ServiceMap(buckets=16)
    m.add_service("B", ["ba", "bb"])
    a, b = m.copy(), m.copy()
    a.set_state("ba", InstanceState.DEAD)
    b.set_state("bb", InstanceState.DEAD)                 # the same epoch, another map
    h.took(0.1, "ctl", m)
    h.took(0.2, "aa", a)
    h.took(0.3, "ab", a)
    assert one_map_per_epoch(h) == []
    h.took(0.4, "ctl2", b)
    assert one_map_per_epoch(h) == [f"t=0.400 ctl2 took a map of epoch {a.epoch} other than the one "
                                    "aa took at t=0.200"]


def _map() -> ServiceMap:
    m = ServiceMap(buckets=16)
    m.add_service("B", ["ba", "bb"])
    return m


def test_converged_needs_the_controllers_map_everywhere_and_nobody_dead_or_joining():
    m = _map()
    assert converged(Final(m, {"ba": m.copy(), "bb": m.copy()}, 0)) == []
    newer = m.copy()
    newer.set_state("bb", InstanceState.JOINING)
    found = converged(Final(newer, {"ba": newer.copy(), "bb": m.copy()}, 0, ["bb"]))
    assert found == [f"bb holds epoch {m.epoch}, the controller {newer.epoch}",
                     "bb is joining in the controller's map", "bb does not serve"]


def test_lost_counted_between_the_sure_and_the_possible():
    m = _map()
    assert lost_counted(Final(m, {}, 2), {1, 2}, {3}) == []
    assert lost_counted(Final(m, {}, 3), {1, 2}, {3}) == []
    assert lost_counted(Final(m, {}, 1), {1, 2}, {3})
    assert lost_counted(Final(m, {}, 4), {1, 2}, {3})
