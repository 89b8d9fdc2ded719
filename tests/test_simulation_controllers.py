"""Several controllers over one shared store, in the whole mesh: no single
point of failure, no split brain."""

from __future__ import annotations

import os

import pytest

from dataplane.sim.faults import CONTROLLER_KINDS, Fault
from dataplane.sim.network import CONTROL, LinkFaults
from dataplane.sim.run import Result, Sim, run

SEEDS = max(4, int(os.environ.get("AMESH_SIM_SEEDS", "30")) // 4)
STEPS = 3
KNOWN_GAP = "lost_counted"
"""As in tests/test_simulation.py: flows_lost is not exact today."""


def broken(r: Result) -> dict[str, list[str]]:
    return {k: v for k, v in r.verdict.violations.items() if v and k != KNOWN_GAP}


@pytest.mark.parametrize("seed", range(SEEDS))
def test_seed_with_two_controllers_keeps_every_invariant(seed):
    r = run(seed, STEPS, controllers=2)
    assert not broken(r), f"{r.verdict.summary()}\nfaults: {r.faults}\nreplay: {r.replay_command()}"


def test_a_seed_with_controllers_replays_the_same_run():
    a, b = run(14, 2, controllers=3), run(14, 2, controllers=3)
    assert (a.faults, a.outcomes, a.epochs, a.sim_seconds) == (b.faults, b.outcomes, b.epochs, b.sim_seconds)
    assert a.replay_command().endswith("--controllers 3")


def test_controllers_race_for_every_failure_and_the_store_keeps_one_map():
    """Both controllers hear bb fall silent and propose the same map from
    the same revision: one transaction wins, the other is refused, its
    controller adopts the winner's map; they hold one map."""
    sim = Sim(4, controllers=2)
    sim.inject(Fault("crash", ("bb",), 0.3))
    ctls = sim.mesh.controllers.values()
    assert sim.mesh.shared_store.refused >= 1
    assert sum(c.ctl.counters["cas_lost"] for c in ctls) >= 1
    assert len({(c.ctl.revision, c.map.to_json()) for c in ctls}) == 1
    r = sim.finish()
    assert not broken(r), r.verdict.summary()


@pytest.mark.parametrize("kind", [*CONTROLLER_KINDS, "ctl_restart"])
@pytest.mark.parametrize("then", [None, "crash", "ctl_cut"])
def test_an_instance_failure_during_a_controller_fault_is_still_handled(kind, then):
    """A controller dies, is cut off, or every controller restarts; while
    it lasts, bb crashes (or is cut from the controllers) and stays so past
    the controllers' return: forwarding goes on, bb's flows move to their
    secondaries once a controller is there to say so, and every invariant
    holds, no map going back or split. A first episode (ab crashes and
    comes back) puts a map in the store: controllers restarted from an empty
    store take the topology's map and, as at a fresh start, watch members
    only from their first heartbeat, so a silent bb would go unnoticed."""
    sim = Sim(21, controllers=2)
    sim.inject(Fault("crash", ("ab",), 0.1))
    sim.faults.inject(Fault(kind, () if kind == "ctl_restart" else ("ctl",), 0.4))
    if then is not None:
        sim.clock.run_until(sim.clock.now + 0.05)
        sim.inject(Fault(then, ("bb",), 0.5))
    else:
        sim.clock.run_until(sim.clock.now + 0.45)
    r = sim.finish()
    assert not broken(r), f"{kind} then {then}: {r.verdict.summary()}"
    if then == "crash":
        assert any("bb missed heartbeats" in what for _, _, what in r.notes)


def _two_views(compare: bool) -> Result:
    """Each controller loses a different instance at once (aa is cut from
    ctl, bb from ctl2): both compute the next map from the same revision,
    with different dead sets."""
    sim = Sim(7, controllers=2, compare=compare)
    net = sim.mesh.net
    cut = [("aa", "ctl"), ("bb", "ctl2")]
    for node, ctl in cut:
        net.impair(node, ctl, CONTROL, LinkFaults(loss=1.0))
    sim.clock.run_until(sim.clock.now + 0.3)
    for node, ctl in cut:
        net.impair(node, ctl, CONTROL, None)
    return sim.finish()


def test_control_without_compare_and_swap_two_controllers_publish_two_maps_of_one_epoch():
    """The checker can see split brain: with blind writes both controllers
    publish their own map under the next epoch, and the forwarders install
    whichever reaches them first."""
    r = _two_views(compare=False)
    assert r.verdict.violations["one_map_per_epoch"], r.verdict.summary()


def test_with_compare_and_swap_the_same_two_views_make_one_map_after_the_other():
    r = _two_views(compare=True)
    assert not broken(r), r.verdict.summary()
    dead = [what for _, _, what in r.notes if "missed heartbeats" in what]
    assert any("aa" in w for w in dead) and any("bb" in w for w in dead)


def test_a_controller_cut_from_every_forwarder_but_not_from_the_store_declares_nobody_dead():
    """ctl hears no forwarder for 300 ms while it still reaches the store:
    its detector declares every member dead, to itself; without a majority
    heard it proposes none of it, and drops each once heard again."""
    sim = Sim(3, controllers=2)
    net, ctl = sim.mesh.net, sim.mesh.controllers["ctl"]
    for n in sim.mesh.nodes:
        net.impair(n, "ctl", CONTROL, LinkFaults(loss=1.0))
    sim.clock.run_until(sim.clock.now + 0.3)
    assert any(f"ctl declared {n} dead" == f"{node} {what}" for _, node, what in sim.mesh.history.notes
               for n in ("ba", "bb"))
    for n in sim.mesh.nodes:
        net.impair(n, "ctl", CONTROL, None)
    r = sim.finish()
    assert not broken(r), r.verdict.summary()
    assert ctl.ctl.counters["failovers"] == 0 and sim.mesh.shared_store.writes == []
