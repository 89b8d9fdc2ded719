"""Controllers sharing one store: deterministic maps, compare-and-swap, the loser adopts."""

from __future__ import annotations

from dataplane.core import syncwire as sw
from dataplane.core.control import (Change, ControlClient, Controller, ControlSend, MapPublished, died,
                                    successor)
from dataplane.core.events import Persist, Propose
from dataplane.core.liveness import FailureDetector
from dataplane.core.servicemap import Instance, InstanceState, ServiceMap
from dataplane.sim.store import SimStore
from tests.conftest import pair_map

KEYS = sw.Keyring({1: b"c" * 32}, 1)
MEMBERS = ("ingress", "ba", "bb", "bc", "egress")


def trio_map() -> ServiceMap:
    """pair_map with a third active B instance: a death leaves a quorum."""
    m = pair_map()
    m.add_instance("B", Instance("bc"))
    return m


def shared(name: str, holddown: float = 1.0) -> Controller:
    return Controller(name, trio_map(), KEYS, 7_000, FailureDetector(0.005, 4, holddown), shared=True)


def hear(ctls: list[Controller], names, now: float) -> list[object]:
    """Every one of `names` heartbeats to every controller (a client made
    afresh each round, with an incarnation of its own, so no replay), and
    the controllers tick."""
    out: list[object] = []
    for n in names:
        for c in ctls:
            client = ControlClient(n, c.endpoint.me, trio_map(), KEYS, 100 + int(now * 1e6))
            for send in client.tick(now):
                out += c.receive(send.data, now)
    for c in ctls:
        out += c.tick(now)
    return out


def proposals(events) -> list[Propose]:
    return [e for e in events if isinstance(e, Propose)]


def answer(store: SimStore, ctl: Controller, p: Propose, now: float) -> list[object]:
    """The shell's part: the transaction, its answer back to the core."""
    r = store.propose(p.data, p.computed_from)
    assert r.stored is not None
    return ctl.on_cas(r.won, r.stored.revision, None if r.won else r.stored.value, now)


def test_the_map_after_a_failure_is_a_function_of_the_previous_map_and_the_dead_set():
    m = trio_map()
    a, ra = successor(m, died(["bb", "ba"]))
    b, rb = successor(m.copy(), died({"ba", "bb"}))
    assert a.to_json() == b.to_json() and ra == rb
    assert [c.reason for c in ra] == ["ba missed heartbeats", "bb missed heartbeats"]
    assert a.epoch == m.epoch + 2 and a.instance("ba").state == a.instance("bb").state == InstanceState.DEAD
    assert m.instance("ba").state == InstanceState.ACTIVE         # the previous map is left alone
    assert successor(a, died(["ba"])) is None                     # already dead: nothing to change
    back = {"ba": Change(InstanceState.JOINING, frozenset({InstanceState.DEAD}), "ba is back")}
    assert successor(m, back) is None                             # applies only to a dead ba
    assert successor(a, back)[0].instance("ba").state == InstanceState.JOINING


def test_two_controllers_racing_to_publish_for_the_same_failure_one_map_wins_both_converge():
    store = SimStore()
    c1, c2 = shared("c1"), shared("c2")
    hear([c1, c2], MEMBERS, 0.0)
    hear([c1, c2], [n for n in MEMBERS if n != "ba"], 0.015)
    p1, p2 = proposals(c1.tick(0.03)), proposals(c2.tick(0.03))   # ba silent past 20 ms, at both
    assert len(p1) == len(p2) == 1 and p1[0].computed_from == p2[0].computed_from == 0
    assert p1[0].data == p2[0].data                               # the same map, computed apart
    assert c1.map.epoch == c2.map.epoch == trio_map().epoch      # nothing of it held before it wins
    won = answer(store, c1, p1[0], 0.032)
    lost = answer(store, c2, p2[0], 0.032)
    assert [e.reason for e in won if isinstance(e, MapPublished)] == ["ba missed heartbeats"]
    assert not [e for e in lost if isinstance(e, MapPublished)]   # the loser adopts, publishes nothing
    assert c2.counters["cas_lost"] == 1 and c2.counters["adopted"] == 1
    assert c1.map == c2.map == ServiceMap.from_json(store.stored.value)
    assert c1.revision == c2.revision == store.revision == 1
    assert c2.map.instance("ba").state == InstanceState.DEAD
    assert not proposals(c1.tick(0.033) + c2.tick(0.033))          # nothing left to propose
    pushed = {e.to for e in lost if isinstance(e, ControlSend)}
    assert {"bb", "bc"} <= pushed                                  # the loser pushes the winner's map


def test_a_loser_with_a_larger_dead_set_adopts_then_proposes_the_rest_from_the_winner():
    store = SimStore()
    c1, c2 = shared("c1"), shared("c2")
    hear([c1, c2], MEMBERS, 0.0)
    hear([c1], ["ingress", "bb", "bc", "egress"], 0.015)           # c1 still hears bb
    hear([c2], ["ingress", "bc", "egress"], 0.015)
    p1, p2 = proposals(c1.tick(0.03))[0], proposals(c2.tick(0.03))[0]
    answer(store, c1, p1, 0.031)
    again = proposals(answer(store, c2, p2, 0.031))
    assert len(again) == 1 and again[0].computed_from == 1          # from the winner's map
    answer(store, c2, again[0], 0.032)
    assert c1.adopt(store.stored.value, store.stored.revision, 0.033)
    assert c1.map == c2.map and c1.revision == c2.revision == 2
    assert [c1.map.instance(n).state for n in ("ba", "bb")] == [InstanceState.DEAD] * 2
    assert c1.map.epoch == trio_map().epoch + 2                     # every map a new epoch


def test_a_stale_compare_and_swap_is_refused_and_an_older_map_never_adopted():
    store = SimStore()
    c1, c2 = shared("c1"), shared("c2")
    answer(store, c1, proposals(c1.operator("bc", "drain", 0.0))[0], 0.0)
    first = store.stored
    answer(store, c1, proposals(c1.operator("bb", "drain", 0.01))[0], 0.01)
    stale = proposals(c2.operator("ba", "drain", 0.02))[0]      # c2 heard of neither map
    assert stale.computed_from == 0
    r = store.propose(stale.data, stale.computed_from)
    assert not r.won and r.stored.revision == 2 and store.refused == 1
    again = proposals(c2.on_cas(False, r.stored.revision, r.stored.value, 0.02))
    assert c2.revision == 2 and c2.map.instance("bb").state == InstanceState.DRAINING
    assert again[0].computed_from == 2                          # its own change, from the winner's map
    assert c2.adopt(first.value, first.revision, 0.03) == [] and c2.revision == 2   # fenced


def test_a_controller_that_hears_less_than_half_proposes_no_death_until_it_hears_most_for_a_timeout():
    c1 = shared("c1")
    hear([c1], MEMBERS, 0.0)
    hear([c1], ["ingress", "ba"], 0.015)                          # c1 is the one cut off
    assert not proposals(c1.tick(0.03))
    assert set(c1._changes) == {"bb", "bc", "egress"}             # declared, to itself only
    assert c1.counters["failovers"] == 0
    heal = hear([c1], ["ingress", "ba", "bb", "bc"], 0.04)        # back; egress not heard (yet)
    assert not proposals(heal + c1.tick(0.05))                   # most heard, not for a timeout yet
    assert set(c1._changes) == {"egress"}                         # the others are heard: dropped
    late = proposals(hear([c1], ["ingress", "ba", "bb", "bc"], 0.055) + c1.tick(0.061))
    assert len(late) == 1                                         # egress stayed silent: dead
    assert ServiceMap.from_json(late[0].data).instance("egress").state == InstanceState.DEAD


def test_a_controller_that_kept_hearing_an_instance_another_declared_dead_makes_it_rejoin():
    """c1 was cut from ba and won; c2 still hears ba, adopts the map, holds
    ba dead itself and, after the hold-down of steady heartbeats, proposes
    it back even if c1 is gone."""
    store = SimStore()
    c1, c2 = shared("c1", 0.05), shared("c2", 0.05)
    hear([c1, c2], MEMBERS, 0.0)
    hear([c1], ["ingress", "bb", "bc", "egress"], 0.015)
    hear([c2], MEMBERS, 0.015)
    answer(store, c1, proposals(c1.tick(0.03))[0], 0.03)
    c2.adopt(store.stored.value, store.stored.revision, 0.03)
    got: list[object] = []
    for i in range(12):
        got += hear([c2], MEMBERS, 0.035 + 0.005 * i) + c2.tick(0.035 + 0.005 * i)
    back = proposals(got)
    assert len(back) == 1 and ServiceMap.from_json(back[0].data).instance("ba").state == InstanceState.JOINING


def test_a_shared_controller_proposes_every_change_and_persists_none():
    c1 = Controller("c1", trio_map(), KEYS, 7_000, FailureDetector(0.005, 4, 1.0), shared=True)
    out = c1.operator("bc", "drain", 0.0)
    assert [type(e) for e in out] == [Propose] and c1.map.epoch == trio_map().epoch
    assert proposals(c1.operator("bb", "drain", 0.0)) == []        # one proposal at a time
    nxt = c1.on_cas(True, 1, None, 0.01)
    assert [type(e) for e in nxt if isinstance(e, (Persist, Propose, MapPublished))] == [MapPublished, Propose]
    assert ServiceMap.from_json(proposals(nxt)[0].data).instance("bb").state == InstanceState.DRAINING


def test_a_client_of_two_controllers_heartbeats_to_both_and_takes_the_first_push():
    keys = {n: sw.Keyring({1: sw.pair_key(b"m" * 32, sw.node_id(n), sw.node_id("ba"))}, 1,
                          senders=[sw.node_id(n)]) for n in ("c1", "c2")}
    master = sw.Keyring({1: b"m" * 32}, 1, pairwise=True)
    c1 = Controller("c1", trio_map(), master, 7_000, FailureDetector(0.005, 4, 1.0), shared=True)
    c2 = Controller("c2", trio_map(), master, 7_001, FailureDetector(0.005, 4, 1.0), shared=True)
    ba = ControlClient("ba", "c1", trio_map(), keys["c1"], 100, others={"c2": keys["c2"]})
    sends = ba.tick(0.0)
    assert sorted(s.to for s in sends) == ["c1", "c2"]
    for s in sends:
        (c1 if s.to == "c1" else c2).receive(s.data, 0.0)
    store = SimStore()
    answer(store, c2, proposals(c2.operator("bc", "drain", 0.01))[0], 0.01)
    newer = [e.data for e in c2.push(0.01) if e.to == "ba"]
    assert [m.smap.epoch for m in ba.receive(newer[0])] == [store_epoch := c2.map.epoch]
    c1.adopt(store.stored.value, store.stored.revision, 0.02)
    assert ba.receive([e.data for e in c1.push(0.02) if e.to == "ba"][0]) == []   # the same map again
    older = Controller("c1", trio_map(), master, 7_002, FailureDetector(0.005, 4, 1.0), shared=True)
    for s in ba.tick(0.03):
        if s.to == "c1":
            older.receive(s.data, 0.03)
    assert ba.receive([e.data for e in older.push(0.03) if e.to == "ba"][0]) == []  # never back
    assert ba.epoch == store_epoch and ba.confirmed
    assert not any(e.rejected for e in ba.endpoints.values())


def test_a_won_answer_that_comes_after_a_newer_map_does_not_take_the_controller_back():
    """The store's watch can bring c1's own write, and the next map on top
    of it, before the answer to c1's transaction: the answer publishes the
    change (it won) but c1 keeps the newer map."""
    store = SimStore()
    c1, c2 = shared("c1"), shared("c2")
    mine = proposals(c1.operator("bc", "drain", 0.0))[0]
    won = store.propose(mine.data, mine.computed_from)
    c2.adopt(store.stored.value, store.stored.revision, 0.001)
    answer(store, c2, proposals(c2.operator("bb", "drain", 0.001))[0], 0.001)
    c1.adopt(store.stored.value, store.stored.revision, 0.002)    # revision 2, from the watch
    out = c1.on_cas(True, won.stored.revision, None, 0.003)
    assert [e.reason for e in out if isinstance(e, MapPublished)] == ["bc draining"]
    assert c1.revision == 2 and c1.map.instance("bb").state == InstanceState.DRAINING
