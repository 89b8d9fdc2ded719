"""A lossy, reordering, duplicating, corrupting link with a simulated clock.

Used by the sync-channel tests and benchmarks to drive two `SyncChannel`s
(or anything that exchanges datagrams) deterministically from a seed.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass


@dataclass
class Faults:
    loss: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    delay: float = 0.0005
    jitter: float = 0.0
    """Extra random delay up to this many seconds: reorders datagrams."""


class SimLink:
    """Datagrams in flight between named endpoints, delivered by time."""

    def __init__(self, seed: int, faults: Faults | None = None) -> None:
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self._heap: list[tuple[float, int, str, bytes]] = []
        self._n = 0
        self.sent = self.lost = self.duplicated = self.corrupted = 0

    def send(self, now: float, to: str, data: bytes) -> None:
        f = self.faults
        self.sent += 1
        if self.rng.random() < f.loss:
            self.lost += 1
            return
        copies = 2 if self.rng.random() < f.duplicate else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            payload = data
            if self.rng.random() < f.corrupt and data:
                i = self.rng.randrange(len(data))
                payload = data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1:]
                self.corrupted += 1
            at = now + f.delay + self.rng.random() * f.jitter
            self._n += 1
            heapq.heappush(self._heap, (at, self._n, to, payload))

    def due(self, now: float) -> list[tuple[str, bytes]]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, _, to, data = heapq.heappop(self._heap)
            out.append((to, data))
        return out

    def __len__(self) -> int:
        return len(self._heap)
