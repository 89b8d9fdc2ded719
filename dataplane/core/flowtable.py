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

The table is bounded, and a flood of new flows must not push out live
connections (issue #14, finding 4: under pure LRU, 10,000 SYNs evicted all
100 established connections of a 10,000-entry table). So every entry has an
*eviction class*: **embryonic** (the responder has not answered yet, as far
as the flow's owner can tell: the service via `established(state)`, or the
node from a reply) or **established**. Each class is its own ordered dict
in last-seen order; at capacity the least recently used *embryonic* entry
goes first, an established one only when no embryonic entry is left
(`evicted_embryonic`, `evicted_established`). `OrderedDict.popitem(last=False)`
is O(1) whatever was deleted before (a plain dict's `next(iter(d))` walks
over the deleted slots at its front, which grew eviction from 10 to 65 us).

Embryonic entries are also counted per tenant (the client id of the
affinity header), so the node can cap what one tenant may hold half-open
(`admits`) and a flood from one tenant cannot fill the table for the others.

Every removal is counted by cause (`evicted_embryonic`,
`evicted_established`, `expired`, `deleted`, ...), so no state disappears
without a counter saying so.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

FlowKey = tuple[int, int, int, bytes, int, bytes, int]
"""(chain, code, proto, lo_ip, lo_port, hi_ip, hi_port)."""

DEFAULT_CAPACITY = 1 << 20
DEFAULT_TIMEOUT = 60.0


class FlowEntry:
    """One flow's state on one instance."""

    __slots__ = ("key", "version", "state", "fwd_hop", "prev_hop", "packets", "rev_packets",
                 "bytes", "created", "last_seen", "timeout", "replica", "promoted", "tenant",
                 "established")

    def __init__(self, key: FlowKey, now: float, state: Any = None, tenant: int | None = None,
                 established: bool = False) -> None:
        self.key = key
        self.tenant = tenant
        """Client id the flow is counted against while embryonic (None: not
        counted, e.g. a replica, whose primary already counted it)."""
        self.established = established
        """Eviction class: set only by `FlowTable.establish`."""
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
    """A bounded map of FlowKey -> FlowEntry: two LRU classes (embryonic
    evicted first), per-tenant embryonic counts, counted removals."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 on_evict: Callable[[FlowEntry, float], None] | None = None) -> None:
        """`on_evict(entry, now)` hears of every entry evicted for room (the
        node remembers the version of a flow it led, so the flow's next
        entry is not older than its replica)."""
        if capacity < 1:
            raise ValueError("flow table capacity must be at least 1")
        self.capacity = capacity
        self.on_evict = on_evict
        self._embryonic: OrderedDict[FlowKey, FlowEntry] = OrderedDict()
        self._established: OrderedDict[FlowKey, FlowEntry] = OrderedDict()
        self._tenants: Counter[int] = Counter()
        """Embryonic entries per tenant (entries with a tenant only)."""
        self.counters: Counter[str] = Counter()
        self.generation = 0
        """Bumped by every removal: a cache holding entries (the node's
        exact-match cache) is valid while this has not moved."""
        self.replicas = 0
        """Entries with `replica` set: the node counts its flag changes
        (`FlowEntry.replica` is set only by it), removals are counted here,
        so metrics read flows by role without walking the table."""

    def __len__(self) -> int:
        return len(self._embryonic) + len(self._established)

    def __iter__(self) -> Iterator[FlowEntry]:
        return iter([*self._embryonic.values(), *self._established.values()])

    def __contains__(self, key: object) -> bool:
        return key in self._established or key in self._embryonic

    @property
    def embryonic(self) -> int:
        """How many entries are embryonic (the rest are established)."""
        return len(self._embryonic)

    def embryonic_of(self, tenant: int) -> int:
        """How many embryonic entries `tenant` holds."""
        return self._tenants[tenant]

    def get(self, key: FlowKey) -> FlowEntry | None:
        """Look up without touching recency (for replicas and inspection)."""
        e = self._established.get(key)
        return e if e is not None else self._embryonic.get(key)

    def lookup(self, key: FlowKey, now: float) -> FlowEntry | None:
        """Look up a flow for a packet: marks it recently used."""
        e = self._established.get(key)
        if e is None:
            e = self._embryonic.get(key)
            if e is None:
                self.counters["misses"] += 1
                return None
        self.seen(e, now)
        return e

    def insert(self, key: FlowKey, now: float, state: Any = None, tenant: int | None = None,
               established: bool = False) -> FlowEntry:
        """Create (or replace) an entry, evicting when full: the least
        recently used embryonic entry, or established one if none is left."""
        old = self._pop(key)
        if old is not None:
            self.generation += 1
        elif len(self) >= self.capacity:
            if self._embryonic:
                _, old = self._embryonic.popitem(last=False)
                self._forget_tenant(old)
                self.counters["evicted_embryonic"] += 1
            else:
                _, old = self._established.popitem(last=False)
                self.counters["evicted_established"] += 1
            self.generation += 1
            if self.on_evict is not None:
                self.on_evict(old, now)
        if old is not None and old.replica:
            self.replicas -= 1
        e = FlowEntry(key, now, state, tenant, established)
        if established:
            self._established[key] = e
        else:
            self._embryonic[key] = e
            if tenant is not None:
                self._tenants[tenant] += 1
        self.counters["inserted"] += 1
        return e

    def establish(self, e: FlowEntry) -> None:
        """Move an embryonic entry to the established class (the responder
        answered). It stops counting against its tenant's cap."""
        if e.established or self._embryonic.pop(e.key, None) is not e:
            return
        self._forget_tenant(e)
        e.established = True
        self._established[e.key] = e

    def delete(self, key: FlowKey, cause: str = "deleted") -> FlowEntry | None:
        e = self._pop(key)
        if e is not None:
            self.counters[cause] += 1
            self.generation += 1
            self.replicas -= e.replica
        return e

    def seen(self, e: FlowEntry, now: float) -> None:
        """`lookup`'s bookkeeping for an entry already in hand (a cache hit)."""
        (self._established if e.established else self._embryonic).move_to_end(e.key)
        e.last_seen = now
        self.counters["hits"] += 1

    def touch(self, key: FlowKey, now: float) -> None:
        """Mark an entry seen at `now` (keeps the table in last-seen order)."""
        e = self.get(key)
        if e is not None:
            e.last_seen = max(e.last_seen, now)
            (self._established if e.established else self._embryonic).move_to_end(key)

    def expire(self, now: float, max_timeout: float, budget: int = 10000) -> list[FlowEntry]:
        """Remove idle entries; returns them so deletes can be mirrored.

        Each class is kept in last-seen order, so its scan stops at the
        first entry seen within `max_timeout` (the longest timeout any entry
        can have): nothing after it can be idle that long. `budget` bounds
        the work of one call (shared by both classes).
        """
        out: list[FlowEntry] = []
        for d in (self._embryonic, self._established):
            scanned = 0
            for e in islice(d.values(), budget):
                scanned += 1
                if e.expires_at() <= now:
                    out.append(e)
                elif e.last_seen + max_timeout > now:
                    break
            budget -= scanned
        for e in out:
            self._pop(e.key)
            self.replicas -= e.replica
        if out:
            self.counters["expired"] += len(out)
            self.generation += 1
        return out

    def _pop(self, key: FlowKey) -> FlowEntry | None:
        e = self._established.pop(key, None)
        if e is None:
            e = self._embryonic.pop(key, None)
            if e is not None:
                self._forget_tenant(e)
        return e

    def _forget_tenant(self, e: FlowEntry) -> None:
        if e.tenant is not None:
            n = self._tenants[e.tenant] - 1
            if n:
                self._tenants[e.tenant] = n
            else:
                del self._tenants[e.tenant]
