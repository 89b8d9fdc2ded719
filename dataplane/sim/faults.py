"""Faults injected into the simulated mesh, chosen from the run's seed.

Each fault is one episode: it starts now and heals itself after its
duration (a crashed process restarts as a new incarnation, a hung loop
resumes, a partition heals: `partition` cuts a node off from every other,
`ctl_cut` only from the controllers, so it is declared dead while the fabric
and its peers still reach it, the split-brain case; a sync link's loss
burst ends, the controllers come back from their store: `ctl_restart`
restarts every one of them). With several controllers sharing a store,
`CONTROLLER_KINDS` are feasible too: `ctl_crash` (one controller dies and
restarts) and `ctl_partition` (one controller is cut off from the network,
the forwarders and the store alike, and reads the store again once back). The run waits until
the mesh is healthy again before the next episode, so two faults overlap
only when a fault is meant to be double (`double`: two instances of one
service crash together).

`pick` chooses only faults the mesh can take as a *single* failure: a
crash, hang or partition leaves at least one other eligible instance of
the service; a double failure needs one more. A double failure records, at
the moment it strikes, which connections lose their firewall state (their
serving instance and its secondary both died): those are the flows the
checker expects in `flows_lost`, and exempts from surviving.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dataplane.core.servicemap import InstanceState
from dataplane.sim.mesh import Mesh
from dataplane.sim.network import CONTROL, SYNC, LinkFaults
from dataplane.sim.workload import TCP, Outcome, Workload

KINDS = ("crash", "hang", "partition", "ctl_cut", "sync_loss", "ctl_restart", "double", "scale_out",
         "drain")
CONTROLLER_KINDS = ("ctl_crash", "ctl_partition")
"""Faults of one controller among several (the others carry on)."""
LOSING_SERVICE = "B"
"""The firewall: the one service whose lost state breaks a flow (a
mid-stream packet without state is misdelivery)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    targets: tuple[str, ...] = ()
    duration: float = 0.0
    loss: float = 0.0

    def __str__(self) -> str:
        extra = f" loss={self.loss:.2f}" if self.kind == "sync_loss" else ""
        return f"{self.kind}({','.join(self.targets)}) {self.duration * 1000:.0f} ms{extra}"


class Faults:
    """Picks, injects and heals faults; remembers the flows a double failure loses."""

    def __init__(self, mesh: Mesh, workload: Workload, rng: random.Random) -> None:
        self.mesh, self.workload, self.rng = mesh, workload, rng
        self.expected_lost: set[int] = set()
        """Connections whose firewall state died with both its holders."""
        self.maybe_lost: set[int] = set()
        """Connections whose state died too but that need not be counted:
        one that ended (its last packets, in flight or sent again by a
        resend buffer, are counted if they reach the new primary), a TCP
        connection in its handshake or a UDP or ICMP exchange (an answer in
        flight that reaches the new primary is counted, a reverse packet
        without state; the client's next packet opens the flow again)."""

    def _states(self) -> dict[str, InstanceState]:
        m = self.mesh.map
        return {n: m.instance(n).state for n in self.mesh.instances()}

    def feasible(self) -> list[Fault]:
        """Every fault the mesh can take now (targets listed, durations not drawn)."""
        st = self._states()
        out: list[Fault] = [Fault("ctl_restart")]
        for svc in self.mesh.topo.services.values():
            active = [n for n in svc.members if st[n] == InstanceState.ACTIVE]
            serving = [n for n in svc.members if st[n] in (InstanceState.ACTIVE, InstanceState.DRAINING)]
            for n in serving:
                if len([a for a in active if a != n]) >= 1:
                    out += [Fault("crash", (n,)), Fault("hang", (n,)), Fault("partition", (n,)),
                            Fault("ctl_cut", (n,))]
            if len(active) >= 3:
                out += [Fault("double", (a, b)) for i, a in enumerate(active) for b in active[i + 1:]]
                out += [Fault("drain", (a,)) for a in active]
            if len(serving) >= 2:
                out += [Fault("sync_loss", (a, b)) for i, a in enumerate(serving) for b in serving[i + 1:]]
            out += [Fault("scale_out", (n,)) for n in svc.members if st[n] == InstanceState.SPARE]
        if len(self.mesh.controllers) > 1:
            out += [Fault(k, (c,)) for k in CONTROLLER_KINDS for c in self.mesh.controllers]
        return out

    def pick(self) -> Fault:
        """A random feasible fault with its duration drawn."""
        rng = self.rng
        f = rng.choice(self.feasible())
        duration = {"crash": rng.uniform(0.05, 0.5), "hang": rng.uniform(0.05, 0.6),
                    "partition": rng.uniform(0.05, 0.6),
                    "ctl_cut": rng.uniform(0.05, 0.6), "sync_loss": rng.uniform(0.05, 0.4),
                    "ctl_restart": rng.uniform(0.02, 0.3), "double": rng.uniform(0.1, 0.5)}.get(f.kind, 0.0)
        if f.kind in CONTROLLER_KINDS:  # drawn apart: the draws of a run with one controller stay as they were
            duration = rng.uniform(0.05, 0.6)
        loss = rng.uniform(0.3, 1.0) if f.kind == "sync_loss" else 0.0
        return Fault(f.kind, f.targets, duration, loss)

    def inject(self, f: Fault) -> None:
        """Start fault `f` now; its healing is scheduled on the clock."""
        mesh, clock = self.mesh, self.mesh.clock
        mesh.history.faults.append((clock.now, f.kind, str(f)))
        if f.kind in ("crash", "double", "ctl_restart", "ctl_crash"):
            targets = f.targets or tuple(mesh.controllers)
            if f.kind == "double":
                self._note_lost(set(targets))
            for t in targets:
                mesh.crash(t)
            clock.after(f.duration, lambda: [mesh.restart(t) for t in targets])
        elif f.kind == "hang":
            node = mesh.nodes[f.targets[0]]
            node.hang()
            clock.after(f.duration, node.resume)
        elif f.kind == "partition":
            mesh.net.partition(f.targets[0])
            clock.after(f.duration, lambda: mesh.net.heal(f.targets[0]))
        elif f.kind == "ctl_cut":  # split brain: declared dead, still on the fabric
            node, ctls = f.targets[0], list(mesh.controllers)
            for ctl in ctls:
                mesh.net.impair(node, ctl, CONTROL, LinkFaults(loss=1.0))
            clock.after(f.duration, lambda: [mesh.net.impair(node, c, CONTROL, None) for c in ctls])
        elif f.kind == "ctl_partition":
            ctl = f.targets[0]
            mesh.net.partition(ctl)
            clock.after(f.duration, lambda: (mesh.net.heal(ctl), mesh.controllers[ctl].resync()))
        elif f.kind == "sync_loss":
            a, b = f.targets
            mesh.net.impair(a, b, SYNC, LinkFaults(loss=f.loss))
            clock.after(f.duration, lambda: mesh.net.impair(a, b, SYNC, None))
        elif f.kind in ("scale_out", "drain"):
            mesh.operator(f.targets[0], f.kind.replace("_", "-"))
        else:
            raise ValueError(f"unknown fault {f.kind!r}")

    def _note_lost(self, dying: set[str]) -> None:
        """The connections whose serving firewall instance and its
        secondary are both in `dying`. Sure to be counted: a TCP connection
        past its handshake, still running, that opened longer ago than the
        resend buffers keep packets (a younger one may open again at the new
        primary when the buffers send its SYN and SYN-ACK there)."""
        m = self.mesh.map
        holder: dict[int, tuple[str, int]] = {}
        opened: dict[int, float] = {}
        for t, svc, node, _, _, code, conn in self.mesh.history.serves:
            if svc == LOSING_SERVICE:
                holder[conn] = (node, code)
                opened.setdefault(conn, t)
        window = max(f.resend.window for f in self.mesh.nodes.values())
        now = self.mesh.clock.now
        for c in self.workload.conns:
            if c.id not in holder:
                continue
            node, code = holder[c.id]
            if node in dying and m.secondary(LOSING_SERVICE, code, exclude=node) in dying:
                sure = (c.proto == TCP and c.handshake and c.outcome == Outcome.RUNNING
                        and now - opened[c.id] > window)
                (self.expected_lost if sure else self.maybe_lost).add(c.id)
