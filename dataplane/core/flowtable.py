"""Per-instance flow tables: pinning, service state, versions, expiry.

A flow is keyed by (chain, code, protocol, low endpoint, high endpoint): the
code routes, but two flows with the same code (a 32-bit hash collision) still
get two entries. An entry holds

* the *pins*: the next hop chosen for each direction the first time (flow
  table first, map on a miss, as the patent family does), so a stream stays
  on its instances when the map changes for other reasons (scale-out);
* the service's per-flow state and a *version* that only grows, bumped on
  every change worth mirroring; a replica applies an update only if its
  version is newer (pfsync's rule), so stale or duplicate updates are inert;
* counters and the last-seen time for idle expiry.

The table is bounded: at capacity the least recently used entry is evicted,
and every removal is counted by cause (`evicted`, `expired`, `deleted`), so
no state disappears without a counter saying so.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator
from itertools import islice
from typing import Any

FlowKey = tuple[int, int, int, bytes, int, bytes, int]
"""(chain, code, proto, lo_ip, lo_port, hi_ip, hi_port)."""

DEFAULT_CAPACITY = 1 << 20
DEFAULT_TIMEOUT = 60.0


class FlowEntry:
    """One flow's state on one instance."""

    __slots__ = ("key", "version", "state", "fwd_hop", "prev_hop", "packets", "rev_packets",
                 "bytes", "created", "last_seen", "timeout", "replica", "promoted")

    def __init__(self, key: FlowKey, now: float, state: Any = None) -> None:
        self.key = key
        self.version = 0
        self.state = state
        self.fwd_hop: str | None = None
        """Pinned next hop toward the server."""
        self.prev_hop: str | None = None
        """Where forward packets came from: the pinned next hop toward the client."""
        self.packets = 0
        self.rev_packets = 0
        """Of `packets`, those in the server-to-client direction."""
        self.bytes = 0
        self.created = now
        self.last_seen = now
        self.timeout = DEFAULT_TIMEOUT
        self.replica = False
        """True while this instance holds the entry only as a mirror."""
        self.promoted = False
        """Was a replica, and a new map made this instance its primary; the
        first packet served from it completes the failover of this flow."""

    def expires_at(self) -> float:
        return self.last_seen + self.timeout

    def __repr__(self) -> str:
        return (f"FlowEntry(code=0x{self.key[1]:08x} v{self.version} pkts={self.packets} "
                f"fwd={self.fwd_hop} prev={self.prev_hop} replica={self.replica})")


class FlowTable:
    """A bounded LRU map of FlowKey -> FlowEntry with counted removals."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("flow table capacity must be at least 1")
        self.capacity = capacity
        self._flows: OrderedDict[FlowKey, FlowEntry] = OrderedDict()
        self.counters: Counter[str] = Counter()
        self.generation = 0
        """Bumped by every removal: a cache holding entries (the node's
        exact-match cache) is valid while this has not moved."""
        self.replicas = 0
        """Entries with `replica` set: the node counts its flag changes
        (`FlowEntry.replica` is set only by it), removals are counted here,
        so metrics read flows by role without walking the table."""

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[FlowEntry]:
        return iter(list(self._flows.values()))

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def get(self, key: FlowKey) -> FlowEntry | None:
        """Look up without touching recency (for replicas and inspection)."""
        return self._flows.get(key)

    def lookup(self, key: FlowKey, now: float) -> FlowEntry | None:
        """Look up a flow for a packet: marks it recently used."""
        e = self._flows.get(key)
        if e is None:
            self.counters["misses"] += 1
            return None
        self.seen(e, now)
        return e

    def insert(self, key: FlowKey, now: float, state: Any = None) -> FlowEntry:
        """Create (or replace) an entry, evicting the LRU entry when full."""
        old = self._flows.pop(key, None)
        if old is not None:
            self.generation += 1
        elif len(self._flows) >= self.capacity:
            _, old = self._flows.popitem(last=False)
            self.counters["evicted"] += 1
            self.generation += 1
        if old is not None and old.replica:
            self.replicas -= 1
        e = FlowEntry(key, now, state)
        self._flows[key] = e
        self.counters["inserted"] += 1
        return e

    def delete(self, key: FlowKey, cause: str = "deleted") -> FlowEntry | None:
        e = self._flows.pop(key, None)
        if e is not None:
            self.counters[cause] += 1
            self.generation += 1
            self.replicas -= e.replica
        return e

    def seen(self, e: FlowEntry, now: float) -> None:
        """`lookup`'s bookkeeping for an entry already in hand (a cache hit)."""
        self._flows.move_to_end(e.key)
        e.last_seen = now
        self.counters["hits"] += 1

    def touch(self, key: FlowKey, now: float) -> None:
        """Mark an entry seen at `now` (keeps the table in last-seen order)."""
        e = self._flows.get(key)
        if e is not None:
            e.last_seen = max(e.last_seen, now)
            self._flows.move_to_end(key)

    def expire(self, now: float, max_timeout: float, budget: int = 10000) -> list[FlowEntry]:
        """Remove idle entries; returns them so deletes can be mirrored.

        Entries are kept in last-seen order, so the scan stops at the first
        entry seen within `max_timeout` (the longest timeout any entry can
        have): nothing after it can be idle that long. `budget` bounds the
        work of one call.
        """
        out = []
        for e in islice(self._flows.values(), budget):
            if e.expires_at() <= now:
                out.append(e)
            elif e.last_seen + max_timeout > now:
                break
        for e in out:
            del self._flows[e.key]
            self.replicas -= e.replica
        if out:
            self.counters["expired"] += len(out)
            self.generation += 1
        return out
