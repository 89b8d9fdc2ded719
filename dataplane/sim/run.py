"""One simulated run from a seed: traffic, faults, quiet time, the checker's verdict.

`run(seed, steps)` builds the mesh (`mesh`), starts the workload
(`workload`), injects `steps` faults (`faults`) one after another, each once
the mesh is healthy again, stops opening connections, lets the mesh settle
for the quiet time, and hands the history to the checker. Everything comes
from `random.Random(seed)`: the same seed and steps replay the same run, so
a failing seed is a bug report (`replay_command`). `controllers` > 1 runs
that many controllers over a shared store (`compare=False`: without its
compare-and-swap, the split-brain control).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from dataplane.core.servicemap import InstanceState
from dataplane.sim.checker import Final, Verdict, check
from dataplane.sim.clock import Clock
from dataplane.sim.faults import Fault, Faults
from dataplane.sim.mesh import Mesh, sim_topology
from dataplane.sim.network import CONTROL, FABRIC, SYNC, LinkFaults
from dataplane.sim.workload import Outcome, Workload

WARMUP = 0.3
SETTLE = 0.2
"""Healthy for this long before the next fault: the bulks of a rejoin land."""
EPISODE_CAP = 4.0
"""An episode that has not healed after this long is left as it is (the
checker's convergence check then tells)."""
QUIET = 3.0
"""After the last fault: connections finish, the mesh converges."""
NETWORK = {FABRIC: LinkFaults(delay=0.0002, jitter=0.0003),
           SYNC: LinkFaults(delay=0.0002, jitter=0.0003, duplicate=0.01),
           CONTROL: LinkFaults(delay=0.0003, jitter=0.0005)}
"""Background faults of every run: jitter reorders, sync datagrams are duplicated."""


@dataclass
class Result:
    seed: int
    steps: int
    policy: str
    verdict: Verdict
    faults: list[tuple[float, str, str]]
    connections: int
    outcomes: dict[str, int]
    sim_seconds: float
    epochs: int
    expected_lost: list[int] = field(default_factory=list)
    notes: list[tuple[float, str, str]] = field(default_factory=list)
    controllers: int = 1

    @property
    def ok(self) -> bool:
        return self.verdict.ok

    def replay_command(self) -> str:
        policy = "" if self.policy == "async" else f" --policy {self.policy}"
        ctls = "" if self.controllers == 1 else f" --controllers {self.controllers}"
        return f"amesh simulate --seed {self.seed} --steps {self.steps}{policy}{ctls}"


def healthy(mesh: Mesh) -> bool:
    """Every process up and serving, no instance dead or joining, every
    forwarder and controller on the authority's epoch, no controller cut off."""
    if mesh.dead or any(c.name in mesh.net.isolated for c in mesh.controllers.values()):
        return False
    m = mesh.map
    if any(not c.alive or c.map.epoch != m.epoch for c in mesh.controllers.values()):
        return False
    for insts in m.services.values():
        if any(i.state in (InstanceState.DEAD, InstanceState.JOINING) for i in insts.values()):
            return False
    return all(f.alive and not f.hung and f.serving and f.map.epoch == m.epoch
               for f in mesh.nodes.values())


def _settle(mesh: Mesh, cap: float) -> None:
    """Run until the mesh has been healthy for SETTLE, or for `cap` at most."""
    clock, end, since = mesh.clock, mesh.clock.now + cap, None
    while clock.now < end:
        clock.run_until(clock.now + 0.02)
        if not healthy(mesh):
            since = None
        elif since is None:
            since = clock.now
        elif clock.now - since >= SETTLE:
            return


class Sim:
    """One run, step by step: `run` drives it from the seed, the hypothesis
    state machine (tests/test_simulation.py) rule by rule."""

    def __init__(self, seed: int, policy: str = "async", controllers: int = 1, compare: bool = True) -> None:
        self.seed, self.policy, self.controllers = seed, policy, controllers
        self.rng = random.Random(seed)
        self.clock = Clock()
        self.mesh = Mesh(self.clock, self.rng, sim_topology(policy), NETWORK, controllers, compare)
        self.workload = Workload(self.clock, self.rng, self.mesh.from_host)
        self.mesh.on_host, self.mesh.flow_of = self.workload.on_host, self.workload.flow_of
        self.faults = Faults(self.mesh, self.workload, self.rng)
        self.steps = 0
        self.workload.start()
        self.clock.run_until(WARMUP)

    def inject(self, f: Fault) -> None:
        """One fault episode: the fault, its healing, and the mesh healthy again."""
        self.steps += 1
        self.faults.inject(f)
        self.clock.run_until(self.clock.now + f.duration + 0.01)
        _settle(self.mesh, EPISODE_CAP)

    def finish(self) -> Result:
        """Stop opening connections, let the mesh settle, and check the history."""
        clock, mesh, workload = self.clock, self.mesh, self.workload
        workload.stop()
        end = clock.now + QUIET
        while clock.now < end and any(c.outcome == Outcome.RUNNING for c in workload.conns):
            clock.run_until(clock.now + 0.05)
        _settle(mesh, max(0.0, end - clock.now) + SETTLE)
        maps = {n: f.map for n, f in mesh.nodes.items()}
        if mesh.shared_store is not None:
            maps.update({n: c.map for n, c in mesh.controllers.items()})
        final = Final(mesh.map, maps,
                      sum(mesh.history.lost_counts.values())
                      + sum(f.node.counters["flows_lost"] for f in mesh.nodes.values()
                            if f.role == "instance"),
                      [n for n, f in mesh.nodes.items() if not f.serving or f.hung])
        verdict = check(mesh.history, workload.conns, workload.misdelivered, final,
                        self.faults.expected_lost, self.faults.maybe_lost)
        outcomes: dict[str, int] = {}
        for c in workload.conns:
            outcomes[c.outcome.value] = outcomes.get(c.outcome.value, 0) + 1
        return Result(self.seed, self.steps, self.policy, verdict, mesh.history.faults,
                      len(workload.conns), outcomes, round(clock.now, 3), mesh.map.epoch,
                      sorted(self.faults.expected_lost), mesh.history.notes, self.controllers)


def run(seed: int, steps: int = 4, policy: str = "async", plan: list[Fault] | None = None,
        controllers: int = 1, compare: bool = True) -> Result:
    """One run from its seed; `plan` replaces the seed's choice of faults."""
    sim = Sim(seed, policy, controllers, compare)
    for i in range(len(plan) if plan is not None else steps):
        sim.inject(plan[i] if plan is not None else sim.faults.pick())
    return sim.finish()
