"""The invariants of a simulated run, checked on its recorded history.

Each check reads only what the run recorded (`dataplane.sim.mesh.History`,
the connections' outcomes, the final state) and returns the violations it
found, each a line a person can follow up. An empty list is a pass.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from dataplane.core.servicemap import InstanceState, ServiceMap
from dataplane.sim.mesh import History
from dataplane.sim.workload import Conn, Outcome


@dataclass
class Final:
    """The mesh at the end of the quiet time."""

    controller_map: ServiceMap
    """The authority: the controller's map, or the shared store's."""
    maps: dict[str, ServiceMap]
    """Each live forwarder's map (and, with a shared store, each controller's)."""
    flows_lost: int
    """flows_lost summed over every instance, crashed incarnations included."""
    not_serving: list[str] = field(default_factory=list)


@dataclass
class Verdict:
    violations: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def summary(self) -> str:
        return "; ".join(f"{k}: {len(v)} ({v[0]})" for k, v in self.violations.items() if v) or "ok"


def flows_survive(conns: list[Conn], misdelivered: list[tuple[float, str, str]],
                  exempt: set[int]) -> list[str]:
    """Every connection completes (all its packets delivered to the right
    endpoint, the firewall letting each through) except those whose state
    a double failure destroyed (`exempt`); nothing reaches a wrong endpoint."""
    out = [f"t={t:.3f} misdelivery at the {where}: {why}" for t, where, why in misdelivered]
    for c in conns:
        if c.id not in exempt and c.outcome != Outcome.DONE:
            out.append(f"conn {c.id} ({_proto(c.proto)} {c.client}:{c.cport} -> {c.server}:{c.sport}, "
                       f"opened t={c.started:.3f}) {c.outcome.value} at step {c.step}/{c.exchanges}")
    return out


def versions_grow(h: History) -> list[str]:
    """A replica applies only updates newer than every one it applied to
    the same flow (a delete included): versions never go backwards."""
    last: dict[tuple[str, int, Any], int] = {}
    out = []
    for t, node, inc, key, version, deleted in h.applies:
        k = (node, inc, key)
        if k in last and version <= last[k]:
            out.append(f"t={t:.3f} {node} applied version {version} of flow code 0x{key[1]:08x} "
                       f"after version {last[k]}{' (a delete)' if deleted else ''}")
        last[k] = max(version, last.get(k, 0))
    return out


def one_server_per_epoch(h: History) -> list[str]:
    """No two instances of one service serve the same flow for the same epoch."""
    who: dict[tuple[str, int, int], set[str]] = defaultdict(set)
    for _, svc, node, _, epoch, _, conn in h.serves:
        who[(svc, conn, epoch)].add(node)
    return [f"service {svc} conn {conn} epoch {epoch} served by {sorted(nodes)}"
            for (svc, conn, epoch), nodes in sorted(who.items()) if len(nodes) > 1]


def epochs_grow(h: History) -> list[str]:
    """Every node's epoch only grows (within one incarnation of its process)."""
    last: dict[tuple[str, int], int] = {}
    out = []
    for t, node, inc, epoch in h.epochs:
        k = (node, inc)
        if epoch < last.get(k, 0):
            out.append(f"t={t:.3f} {node} went from epoch {last[k]} back to {epoch}")
        last[k] = max(epoch, last.get(k, 0))
    return out


def one_map_per_epoch(h: History) -> list[str]:
    """No two different maps ever carry the same epoch, anywhere: the
    forwarders install by epoch alone, so two maps of one epoch split them
    for good (some hold one, some the other: split brain)."""
    first: dict[int, tuple[float, str, str]] = {}
    out = []
    for t, node, epoch, digest in h.maps:
        if epoch not in first:
            first[epoch] = (t, node, digest)
        elif first[epoch][2] != digest:
            t0, node0, _ = first[epoch]
            out.append(f"t={t:.3f} {node} took a map of epoch {epoch} other than the one "
                       f"{node0} took at t={t0:.3f}")
            first[epoch] = (t, node, digest)
    return out


def converged(final: Final) -> list[str]:
    """After the quiet time every forwarder holds the controller's map, and
    no instance is left dead, joining or declared dead."""
    m = final.controller_map
    out = [f"{n} holds epoch {s.epoch}, the controller {m.epoch}"
           for n, s in sorted(final.maps.items()) if s.epoch != m.epoch or s != m]
    out += [f"{n} is {i.state.value} in the controller's map"
            for insts in m.services.values() for n, i in insts.items()
            if i.state in (InstanceState.DEAD, InstanceState.JOINING)]
    out += [f"{n} does not serve" for n in final.not_serving]
    return out


def lost_counted(final: Final, expected: set[int], maybe: set[int]) -> list[str]:
    """`flows_lost` counts exactly the flows whose primary and secondary both
    died (those that may carry on count or not: see `faults.Faults.maybe_lost`;
    `check` leaves out the ones that completed anyway)."""
    lo, hi = len(expected), len(expected) + len(maybe)
    if lo <= final.flows_lost <= hi:
        return []
    return [f"flows_lost is {final.flows_lost}; the double failures destroyed the state of "
            f"{lo} flows (+{len(maybe)} that may carry on): {sorted(expected)}"]


CHECKS = ("flows_survive", "versions_grow", "one_server_per_epoch", "epochs_grow", "one_map_per_epoch",
          "converged", "lost_counted")


def check(h: History, conns: list[Conn], misdelivered: list[tuple[float, str, str]], final: Final,
          expected_lost: set[int], maybe_lost: set[int]) -> Verdict:
    """Every invariant of a run; see each check's docstring."""
    return Verdict({
        "flows_survive": flows_survive(conns, misdelivered, expected_lost | maybe_lost),
        "versions_grow": versions_grow(h),
        "one_server_per_epoch": one_server_per_epoch(h),
        "epochs_grow": epochs_grow(h),
        "one_map_per_epoch": one_map_per_epoch(h),
        "converged": converged(final),
        "lost_counted": lost_counted(final, expected_lost - _completed(conns), maybe_lost),
    })


def _completed(conns: list[Conn]) -> set[int]:
    """The connections that completed. One the double failure was expected
    to break found its state after all: a replica kept by the instance that
    was the bucket's secondary in an earlier epoch (a rejoin moved the role
    on without deleting it), promoted in place of the lost one. Its state
    is not lost, and it is not counted."""
    return {c.id for c in conns if c.outcome == Outcome.DONE}


def _proto(p: int) -> str:
    return {6: "tcp", 17: "udp", 1: "icmp"}.get(p, str(p))
