"""The service map in an etcd v3 store: fencing, compare-and-swap, watch resume.

Pure decisions, no I/O: `dataplane.shells.etcdstore` does the talking and
asks this module what to do.

* **Fencing.** Every write of the map key gets a new etcd revision (its
  `mod_revision`), and revisions only grow, so the revision a node installed
  is the fencing token of its map: `Fence` installs a map only if its
  revision is higher than the one it has. A map read late from a lagging
  member, an event replayed after a resume, a controller that wakes up with
  an old map: all are refused, so no node ever goes back.
* **Compare-and-swap.** A controller computes a new map from the map at
  revision R and writes it in a transaction that compares the key's
  `mod_revision` with R (0: the key does not exist yet): of two controllers
  that computed from R, exactly one wins; the other's transaction fails, and
  its failure branch reads the key, so the loser learns the winner's map and
  revision in the same round trip (`CasResult`).
* **Watch resume.** `Follower` is a small state machine fed with what the
  store said (`Read`, `Event`, `Broken`, `Compacted`) and returning what to
  do next (`DoRead`, `DoWatch`, `Install`, `Pause`). It starts from a known
  revision (a read, or the revision a node already has); after a broken
  stream it watches again from the last revision it saw + 1, on the next
  endpoint, after a back-off; when that revision has been compacted away it
  reads the key afresh (the read's header revision says up to where it is
  current) and watches from the read's revision + 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAP_KEY = "map"
"""The map's key under the store's prefix (``/amesh/<lab>/map``)."""
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0


@dataclass(frozen=True)
class Stored:
    """A map as the store holds it: the document and its `mod_revision`."""

    value: bytes
    revision: int


@dataclass
class Fence:
    """The revision of the map a node has installed (0: none yet)."""

    installed: int = 0

    def admit(self, revision: int) -> bool:
        """True, and the fence moves, if `revision` is newer than what is
        installed; False for the same or an older one."""
        if revision <= self.installed:
            return False
        self.installed = revision
        return True


@dataclass(frozen=True)
class Cas:
    """The transaction of one map write: compare, then put or read back."""

    key: str
    value: bytes
    expect: int
    """`mod_revision` the key must still have: the revision the new map was
    computed from (0: the key must not exist)."""


def cas(key: str, value: bytes, computed_from: int) -> Cas:
    """The compare-and-swap that writes `value`, computed from the map at
    revision `computed_from` (0 for the first map)."""
    if computed_from < 0:
        raise ValueError(f"a revision is never negative, got {computed_from}")
    return Cas(key, value, computed_from)


@dataclass(frozen=True)
class CasResult:
    """How a write went: won (our map is stored at `stored.revision`) or
    lost (`stored` is the map that won, read in the failure branch;
    None if the key is gone)."""

    won: bool
    stored: Stored | None


def cas_result(txn: Cas, succeeded: bool, header_revision: int, current: Stored | None) -> CasResult:
    """Interpret a transaction's answer: on success the put's revision is
    the response header's (the transaction is one revision)."""
    if succeeded:
        return CasResult(True, Stored(txn.value, header_revision))
    return CasResult(False, current)


# -- following the map: what the store said, and what to do -----------------------------

@dataclass(frozen=True)
class Read:
    """A read of the map key: `stored` (None: no map yet) at `header_revision`."""

    stored: Stored | None
    header_revision: int


@dataclass(frozen=True)
class Event:
    """A watch event on the map key: a put (`value`) or a delete (None)."""

    value: bytes | None
    revision: int


@dataclass(frozen=True)
class Broken:
    """The watch stream (or the connection) ended without being asked to."""


@dataclass(frozen=True)
class Compacted:
    """The watch's start revision is gone: compacted up to `revision`."""

    revision: int


@dataclass(frozen=True)
class DoRead:
    """Read the map key (and the store's header revision) on `endpoint`."""

    endpoint: int


@dataclass(frozen=True)
class DoWatch:
    """Watch the map key from `start_revision` (inclusive) on `endpoint`."""

    start_revision: int
    endpoint: int


@dataclass(frozen=True)
class Install:
    """Install this map: newer than the node's (the fence moved)."""

    stored: Stored


@dataclass(frozen=True)
class Pause:
    """Wait `seconds` before the next action (back-off after a failure)."""

    seconds: float


Said = Read | Event | Broken | Compacted
Action = DoRead | DoWatch | Install | Pause


@dataclass
class Follower:
    """Follows the map key through broken streams and compactions.

    States: ``reading`` (a read is asked for), ``watching`` (a watch from
    `next_revision` is asked for or running). `next_revision` is always the
    last revision seen + 1, so a resumed watch neither misses nor repeats
    anything; `fence` keeps what was installed from going back.
    """

    endpoints: int = 1
    fence: Fence = field(default_factory=Fence)
    endpoint: int = 0
    state: str = "reading"
    next_revision: int = 0
    failures: int = 0
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("reads", "resumes", "compactions", "installs", "refused", "deletes"), 0))

    def start(self, known_revision: int = 0) -> list[Action]:
        """Begin: from a revision the node already has (its installed map's),
        watch from the next one; with none, read first."""
        if known_revision > 0:
            self.fence.admit(known_revision)
            return self._watch(known_revision + 1)
        return self._read()

    def on(self, said: Said) -> list[Action]:
        """What to do after the store said `said`."""
        if isinstance(said, Read):
            if self.state != "reading":
                raise ValueError("a read answer while not reading")
            self.failures = 0
            out = self._install(said.stored) if said.stored is not None else []
            return out + self._watch(said.header_revision + 1)
        if isinstance(said, Event):
            if self.state != "watching" or said.revision < self.next_revision:
                self.counters["refused"] += 1      # a stale or repeated event
                return []
            self.failures = 0
            self.next_revision = said.revision + 1
            if said.value is None:
                self.counters["deletes"] += 1      # the map is never deleted: keep ours
                return []
            return self._install(Stored(said.value, said.revision))
        if isinstance(said, Compacted):
            self.counters["compactions"] += 1
            return self._read()
        if isinstance(said, Broken):
            self.counters["resumes"] += 1
            self.failures += 1
            self.endpoint = (self.endpoint + 1) % self.endpoints
            pause = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
            if self.state == "reading":
                return [Pause(pause), *self._read()]
            return [Pause(pause), *self._watch(self.next_revision)]
        raise TypeError(f"not something the store says: {said!r}")

    def _read(self) -> list[Action]:
        self.state = "reading"
        self.counters["reads"] += 1
        return [DoRead(self.endpoint)]

    def _watch(self, start: int) -> list[Action]:
        self.state = "watching"
        self.next_revision = start
        return [DoWatch(start, self.endpoint)]

    def _install(self, stored: Stored) -> list[Action]:
        if not self.fence.admit(stored.revision):
            self.counters["refused"] += 1
            return []
        self.counters["installs"] += 1
        return [Install(stored)]
