"""The shared map store of a simulated mesh: one etcd key, its revisions, its watchers.

What the controllers of a shared store rely on from etcd, and nothing more:
every write of the key gets the store's next revision (its `mod_revision`),
so the revision a map was stored at is its fencing token
(`dataplane.core.mapstore`); a transaction compares the key's revision with
the one the writer computed from and writes only when they are equal, and
its answer carries the map that is there (`Cas`, `CasResult`); a watcher
hears every write in order. The decisions are `mapstore`'s own (`cas`,
`cas_result`), so the simulator tests the same semantics the etcd shell uses.

`cas=False` makes every transaction a blind write that always succeeds:
the control of the split-brain test, which shows what the comparison is for.

It does no timing: how long a request takes, and whether a controller cut
off from the network reaches it at all, is the mesh's business
(`dataplane.sim.mesh.SimController`).
"""

from __future__ import annotations

from collections.abc import Callable

from dataplane.core.mapstore import MAP_KEY, Cas, CasResult, Read, Stored, cas, cas_result

Watcher = Callable[[Stored], None]
"""Called with every map written, in revision order."""


class SimStore:
    """One key, compare-and-swap on its `mod_revision`, watchers."""

    def __init__(self, compare: bool = True) -> None:
        self.compare = compare
        """False: transactions do not compare (the control)."""
        self.revision = 0
        """The store's revision: grows by one on every write."""
        self.stored: Stored | None = None
        self.watchers: list[Watcher] = []
        self.writes: list[Stored] = []
        self.refused = 0
        """Transactions whose comparison failed (the race's losers)."""

    def read(self) -> Read:
        """The key with the store's header revision (current up to there)."""
        return Read(self.stored, self.revision)

    def propose(self, data: bytes, computed_from: int) -> CasResult:
        """The transaction of a controller's proposal (`Propose`)."""
        return self.txn(cas(MAP_KEY, data, computed_from))

    def txn(self, t: Cas) -> CasResult:
        """Compare the key's revision with `t.expect` (0: no key); on a match
        put the value at the next revision, else answer with what is there."""
        held = self.stored.revision if self.stored is not None else 0
        if self.compare and held != t.expect:
            self.refused += 1
            return cas_result(t, False, self.revision, self.stored)
        self.revision += 1
        self.stored = Stored(t.value, self.revision)
        self.writes.append(self.stored)
        for w in list(self.watchers):
            w(self.stored)
        return cas_result(t, True, self.revision, self.stored)
