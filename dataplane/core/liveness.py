"""Failure detection from heartbeats: dead after `misses` silent intervals.

The detector is fed "heard from X at t" and clock ticks, and returns
`Declared` events. Defaults here: 10 ms interval x 5 misses = declared dead
50 ms after the last heartbeat (the lab's controller runs 10 ms x 10, see
`labs/default.toml`; the sync channels' own detector 20 ms x 4). A peer declared dead is not declared alive again
until it has been heard steadily for `holddown` (default 1 s): a flapping
instance (a hang that comes and goes, a lossy link) would otherwise move its
buckets back and forth, and every move costs a failover.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Health(str, Enum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Declared:
    """`peer` was declared `health` at `at` (last heard at `last_heard`)."""

    peer: str
    health: Health
    at: float
    last_heard: float


@dataclass
class _Peer:
    health: Health = Health.UNKNOWN
    last_heard: float = -1.0
    heard_since: float = -1.0
    """Start of the current unbroken run of heartbeats."""


class FailureDetector:
    """Heartbeat-miss failure detector with hold-down."""

    def __init__(self, interval: float = 0.010, misses: int = 5, holddown: float = 1.0) -> None:
        if interval <= 0 or misses < 1 or holddown < 0:
            raise ValueError("interval > 0, misses >= 1 and holddown >= 0 are required")
        self.interval = interval
        self.misses = misses
        self.holddown = holddown
        self.peers: dict[str, _Peer] = {}

    @property
    def timeout(self) -> float:
        return self.interval * self.misses

    def watch(self, peer: str, now: float) -> None:
        """Start watching `peer` as if just heard (so silence from now counts)."""
        self.peers.setdefault(peer, _Peer(Health.ALIVE, now, now))

    def declare_dead(self, peer: str, now: float) -> None:
        """Another controller declared `peer` dead (its map won the store):
        hold it dead here too, so that this detector, too, declares it alive
        only after `holddown` of steady heartbeats from now. Without this a
        controller that kept hearing it would never see it come back, and
        would never make it rejoin. A peer held dead already is left as is."""
        p = self.peers.setdefault(peer, _Peer())
        if p.health != Health.DEAD:
            p.health = Health.DEAD
            p.heard_since = now

    def silent(self, peer: str, now: float) -> bool:
        """Not heard within the timeout (or never): the level that the
        DEAD event is the edge of."""
        p = self.peers.get(peer)
        return p is None or p.last_heard < 0 or now - p.last_heard > self.timeout

    def forget(self, peer: str) -> None:
        self.peers.pop(peer, None)

    def heard(self, peer: str, now: float) -> list[Declared]:
        p = self.peers.setdefault(peer, _Peer())
        if p.last_heard < 0 or now - p.last_heard > self.timeout:
            p.heard_since = now
        p.last_heard = now
        if p.health == Health.UNKNOWN:
            p.health = Health.ALIVE
            return [Declared(peer, Health.ALIVE, now, now)]
        if p.health == Health.DEAD and now - p.heard_since >= self.holddown:
            p.health = Health.ALIVE
            return [Declared(peer, Health.ALIVE, now, now)]
        return []

    def tick(self, now: float) -> list[Declared]:
        out = []
        for name, p in self.peers.items():
            if p.health == Health.ALIVE and now - p.last_heard > self.timeout:
                p.health = Health.DEAD
                out.append(Declared(name, Health.DEAD, now, p.last_heard))
        return out

    def health(self, peer: str) -> Health:
        p = self.peers.get(peer)
        return p.health if p else Health.UNKNOWN
