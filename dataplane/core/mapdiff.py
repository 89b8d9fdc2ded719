"""Compare two service maps bucket by bucket, and plan what-if changes.

This is how an operator (and the tests) see the cost of a change before
making it: which buckets change primary, whether any moved bucket's old
primary is still alive (collateral disruption, which should be zero), and
whether each moved bucket landed on its former secondary (where the state
already is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dataplane.core.servicemap import NO_INSTANCE, Instance, InstanceState, ServiceMap


@dataclass
class ServiceDiff:
    """Role changes of one service's buckets between two maps."""

    service: str
    buckets: int
    before: dict[str, int]
    after: dict[str, int]
    moved: int = 0
    collateral: int = 0
    to_secondary: int = 0
    secondary_changed: int = 0
    moves: dict[str, int] = field(default_factory=dict)
    """'old->new' primary pairs and how many buckets took that move."""

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "buckets": self.buckets,
                "before": self.before, "after": self.after, "moved": self.moved,
                "moved_fraction": round(self.moved / self.buckets, 6),
                "collateral": self.collateral, "to_secondary": self.to_secondary,
                "secondary_changed": self.secondary_changed, "moves": self.moves}


def diff(old: ServiceMap, new: ServiceMap) -> dict[str, ServiceDiff]:
    """Per service present in both maps, how the roles changed."""
    if old.buckets != new.buckets:
        raise ValueError("maps with different bucket counts cannot be compared bucket by bucket")
    out = {}
    for service in old.services.keys() & new.services.keys():
        t0, t1 = old.table(service), new.table(service)
        before = t0.primary_counts()
        d = ServiceDiff(service, old.buckets, before, {**dict.fromkeys(before, 0), **t1.primary_counts()})
        n0, n1 = t0.names, t1.names
        p0, p1 = t0.ranks[0], t1.ranks[0]
        s0 = t0.ranks[1] if len(t0.ranks) > 1 else None
        s1 = t1.ranks[1] if len(t1.ranks) > 1 else None
        for b in range(old.buckets):
            a = _name(n0, p0[b])
            z = _name(n1, p1[b])
            if s0 is not None and s1 is not None and _name(n0, s0[b]) != _name(n1, s1[b]):
                d.secondary_changed += 1
            if a == z:
                continue
            d.moved += 1
            key = f"{a}->{z}"
            d.moves[key] = d.moves.get(key, 0) + 1
            if a is not None and new.is_alive(a) and \
                    new.services[service][a].state == InstanceState.ACTIVE:
                d.collateral += 1
            if s0 is not None and z is not None and _name(n0, s0[b]) == z:
                d.to_secondary += 1
        out[service] = d
    return out


def _name(names: list[str], i: int) -> str | None:
    return names[i] if i < len(names) else None


def plan(services: dict[str, list[str]], fail: list[str], add: list[str],
         buckets: int, replicas: int = 2, hosts: dict[str, str] | None = None,
         fail_hosts: list[str] = (), anti_affinity: bool = True,
         ) -> tuple[ServiceMap, ServiceMap, dict[str, ServiceDiff]]:
    """Build the map of `services`, apply failures and additions, diff.

    An added name goes to the service given as ``SERVICE=NAME``, or, bare, to
    the only service (an error when there are several). `hosts` places
    instances on hosts (instance -> host; absent: a host of its own);
    failing a host fails every instance on it.
    """
    hosts = hosts or {}
    before = ServiceMap(buckets=buckets, replicas=replicas, anti_affinity=anti_affinity)
    for s, names in services.items():
        before.add_service(s, [Instance(n, host=hosts.get(n, "")) for n in names])
    after = before.copy()
    for h in fail_hosts:
        on = [n for s in before.services.values() for n, i in s.items() if i.machine == h]
        if not on:
            raise ValueError(f"--fail-host {h}: no instance is on host {h!r}")
        fail = [*fail, *on]
    for name in dict.fromkeys(fail):
        after.set_state(name, InstanceState.DEAD)
    for item in add:
        service, _, name = item.rpartition("=")
        if not service:
            if len(services) != 1:
                raise ValueError(f"--add {item}: say which service, as SERVICE=NAME")
            service = next(iter(services))
        after.add_instance(service, Instance(name))
    return before, after, diff(before, after)


def lost(m: ServiceMap, dead: set[str]) -> dict[str, int]:
    """Per service, the buckets of `m` whose primary and secondary (the
    instance its state is mirrored to) are both in `dead`, or whose lone
    primary is: failing them together loses those buckets' flow state."""
    out = {}
    for service in m.services:
        t = m.table(service)
        gone = {i for i, n in enumerate(t.names) if n in dead} | {NO_INSTANCE}
        prim = t.ranks[0]
        sec = t.ranks[1] if len(t.ranks) > 1 else [NO_INSTANCE] * m.buckets
        out[service] = sum(1 for p, s in zip(prim, sec) if p in gone and p != NO_INSTANCE and s in gone)
    return out
