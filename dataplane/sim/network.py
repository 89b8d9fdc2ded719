"""A simulated datagram network between named nodes.

Every datagram (fabric packet, sync datagram, control message) crosses it:
per-kind link faults (loss, duplication, delay with jitter, which reorders),
per-pair overrides (a loss burst on one sync link) and partitions (a node
cut off from every other). All randomness comes from the one
`random.Random` of the run, so a seed replays the same losses.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from dataplane.sim.clock import Clock

FABRIC, SYNC, CONTROL = "fabric", "sync", "control"


@dataclass(frozen=True)
class LinkFaults:
    """What a datagram may suffer on a link: the jitter (up to this many
    seconds on top of `delay`) is what reorders datagrams."""

    loss: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0002
    jitter: float = 0.0


Receiver = Callable[[str, str, str, bytes], None]
"""deliver(dst, src, kind, data)."""


class Network:
    """Datagrams in flight, delivered by the clock."""

    def __init__(self, clock: Clock, rng: random.Random, deliver: Receiver,
                 faults: dict[str, LinkFaults] | None = None) -> None:
        self.clock = clock
        self.rng = rng
        self.deliver = deliver
        self.faults = faults or {}
        self.pair_faults: dict[tuple[frozenset[str], str], LinkFaults] = {}
        """(the two ends, kind) -> faults replacing the kind's for that pair."""
        self.isolated: set[str] = set()
        self.counters: Counter[str] = Counter()

    def partition(self, node: str) -> None:
        """Cut `node` off from every other node (both directions)."""
        self.isolated.add(node)

    def heal(self, node: str) -> None:
        self.isolated.discard(node)

    def impair(self, a: str, b: str, kind: str, faults: LinkFaults | None) -> None:
        """Replace the faults of one link (both directions); None restores."""
        key = (frozenset((a, b)), kind)
        if faults is None:
            self.pair_faults.pop(key, None)
        else:
            self.pair_faults[key] = faults

    def send(self, src: str, dst: str, kind: str, data: bytes) -> None:
        """Put a datagram on the wire; it may be lost, duplicated or delayed."""
        self.counters[f"{kind}_sent"] += 1
        if src in self.isolated or dst in self.isolated:
            self.counters[f"{kind}_partitioned"] += 1
            return
        f = self.pair_faults.get((frozenset((src, dst)), kind)) or self.faults.get(kind) or _CLEAN
        rng = self.rng
        if f.loss and rng.random() < f.loss:
            self.counters[f"{kind}_lost"] += 1
            return
        copies = 2 if f.duplicate and rng.random() < f.duplicate else 1
        self.counters[f"{kind}_duplicated"] += copies - 1
        for _ in range(copies):
            delay = f.delay + (rng.random() * f.jitter if f.jitter else 0.0)
            self.clock.after(delay, lambda: self._arrive(src, dst, kind, data))

    def _arrive(self, src: str, dst: str, kind: str, data: bytes) -> None:
        if src in self.isolated or dst in self.isolated:  # cut while in flight
            self.counters[f"{kind}_partitioned"] += 1
            return
        self.deliver(dst, src, kind, data)


_CLEAN = LinkFaults()
