"""Where the controller keeps its map: a file, or etcd.

The controller's core emits a `Persist` event for every map it publishes,
before the pushes of that map, and is built with what was kept when it
restarts. The shell hands each `Persist` to a keeper and blocks until it is
kept, so no forwarder holds a map the store does not:

* `FileKeep` (`store = "embedded"`): the map file in the lab's run
  directory, replaced whole by a rename, so a controller killed mid-write
  comes back with the old map or the new.
* `EtcdKeep` (`store = "etcd"`): the key ``/amesh/<lab>/map`` on an etcd
  cluster. Each write is `EtcdMapStore.write`'s compare-and-swap against
  the revision the keeper last read or wrote; the etcd client is asyncio,
  so the keeper runs its own event loop and each call to completion (a
  write on the lab's cluster took a few milliseconds here). An endpoint
  that fails is skipped for the next one. A lost compare-and-swap (another
  writer moved the key) is counted and raised as `Conflict` with the
  winner's revision learnt.

Several controllers sharing the map (`[controller] peers`) do not keep a
map: each proposes the next by compare-and-swap from the revision it was
computed from (`EtcdKeep.propose`, answered to the core's `on_cas`), and
follows the key (`Following`) to adopt what the others won.

Both raise `KeepError` when the map could not be kept; the shell counts it
and forwarding goes on with the map in memory. `Retrying` wraps either and
remembers the newest map it refused, for the shell to try again: a write
that fell into an etcd leader election would otherwise leave the store one
map behind until the next failure. The etcd client (gRPC) is
imported only by a controller that uses etcd: the forwarders never load it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from dataplane.core.mapstore import CasResult, Stored
from dataplane.lab.topology import Topology

T = TypeVar("T")
KEEP_TIMEOUT = 0.5
"""Seconds one etcd endpoint may take to answer the controller's read or write."""
PERSIST_RETRY = 0.5
"""Seconds between tries to keep a map the store refused."""
START_TIMEOUT = 30.0
"""Seconds a starting controller waits for the cluster to answer its first read."""


class KeepError(Exception):
    """The map could not be kept (or read)."""


class Conflict(KeepError):
    """The compare-and-swap lost: the key is not at the revision we wrote from."""


def keeper(topo: Topology, path: Path) -> Retrying:
    """The keeper of a topology's `[controller] store`: the map file at
    `path`, or the lab's key on its etcd cluster, retried when refused."""
    if topo.store == "etcd":
        # the controller's loop waits for each write: a dead member may cost
        # at most this before the next is tried (a write takes milliseconds)
        return Retrying(EtcdKeep(topo.etcd_endpoints, f"/amesh/{topo.name}", timeout=KEEP_TIMEOUT))
    return Retrying(FileKeep(path))


class Retrying:
    """A keeper that remembers the newest map it could not keep (`due`
    hands it back every `every` seconds until it is kept or a newer map
    replaces it). A lost compare-and-swap is not retried: another writer
    holds the key, and writing over it is the shared controllers' call."""

    def __init__(self, inner: FileKeep | EtcdKeep, every: float = PERSIST_RETRY) -> None:
        self.inner, self.every = inner, every
        self.unkept: tuple[bytes, float] | None = None
        """The refused map and when it was last tried."""

    def describe(self) -> dict[str, object]:
        return self.inner.describe()

    def load(self) -> bytes | None:
        return self.inner.load()

    @property
    def revision(self) -> int:
        """The store revision of the map last read or written (0: a file)."""
        return self.inner.revision

    def keep(self, data: bytes, now: float) -> None:
        self.unkept = None
        try:
            self.inner.keep(data)
        except Conflict:
            raise
        except KeepError:
            self.unkept = data, now
            raise

    def due(self, now: float) -> bytes | None:
        """The refused map, once it is time to try it again."""
        if self.unkept is not None and now - self.unkept[1] >= self.every:
            return self.unkept[0]
        return None


class FileKeep:
    revision = 0
    """A file has no revisions."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> dict[str, object]:
        return {"kind": "embedded", "path": str(self.path)}

    def load(self) -> bytes | None:
        return self.path.read_bytes() if self.path.exists() else None

    def keep(self, data: bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(self.path)
        except OSError as exc:
            raise KeepError(f"map file not written: {exc}") from None


class EtcdKeep:
    def __init__(self, endpoints: list[str], prefix: str, timeout: float = 2.0) -> None:
        from aetcd import exceptions as etcd_errors

        from dataplane.shells.etcdstore import EtcdMapStore

        self.failures = (etcd_errors.ClientError, asyncio.TimeoutError, OSError)
        self.store = EtcdMapStore(endpoints, prefix, timeout)
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.revision = 0
        """The map key's revision as last read or written (0: no key yet)."""
        self.endpoint = 0
        """The endpoint that answered last; tried first."""

    def describe(self) -> dict[str, object]:
        return {"kind": "etcd", "key": self.store.key.decode(), "revision": self.revision,
                "endpoint": "http://%s:%d" % self.store.endpoints[self.endpoint]}

    def _call(self, op: Callable[[int], Awaitable[T]]) -> T:
        """`op(endpoint)` on the last endpoint that answered, then the others."""
        n = len(self.store.endpoints)
        errors = []
        for k in range(n):
            ep = (self.endpoint + k) % n
            try:
                out = self.loop.run_until_complete(asyncio.wait_for(op(ep), self.timeout))
            except self.failures as exc:
                errors.append(f"{self.store.endpoints[ep][0]}: {type(exc).__name__} {exc}".strip())
                continue
            self.endpoint = ep
            return out
        raise KeepError("etcd did not answer: " + "; ".join(errors))

    def load(self, wait: float = START_TIMEOUT) -> bytes | None:
        """The stored map (None: none yet), waiting up to `wait` seconds for
        a cluster that is still electing its leader."""
        deadline = time.monotonic() + wait
        while True:
            try:
                got = self._call(self.store.read)
                break
            except KeepError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.revision = got.stored.revision if got.stored else 0
        return got.stored.value if got.stored else None

    def keep(self, data: bytes) -> None:
        res = self._call(lambda ep: self.store.write(data, self.revision, ep))
        was = self.revision
        self.revision = res.stored.revision if res.stored else 0
        if not res.won:
            raise Conflict(f"the map key moved from revision {was} to {self.revision} under us")

    def propose(self, data: bytes, computed_from: int) -> CasResult:
        """Write `data` if the key is still at `computed_from` (a shared
        controller's proposal): won, or lost with the winner's map."""
        res = self._call(lambda ep: self.store.write(data, computed_from, ep))
        if res.stored is not None:
            self.revision = max(self.revision, res.stored.revision)
        return res

    def close(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


class Following:
    """`EtcdMapStore.follow` on a thread of its own, with its own event loop
    and clients, for a shell whose loop is not asyncio: every map newer than
    `known_revision` lands in `maps`, which the shell drains on its tick. The
    follower resumes broken watches and re-reads after a compaction
    (`dataplane.shells.etcdstore`); the thread only waits on gRPC, so it
    costs the controller's loop nothing between maps."""

    def __init__(self, endpoints: list[str], prefix: str, known_revision: int) -> None:
        self.maps: queue.SimpleQueue[Stored] = queue.SimpleQueue()
        self.error: str | None = None
        """Why the thread ended, if it ended before `close` (then no map
        comes any more: the controller's status shows it)."""
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, args=(endpoints, prefix, known_revision),
                                        name="etcd-follow", daemon=True)
        self._thread.start()

    def _run(self, endpoints: list[str], prefix: str, known_revision: int) -> None:
        from dataplane.shells.etcdstore import EtcdMapStore

        async def follow() -> None:
            store = EtcdMapStore(endpoints, prefix)
            try:
                await store.follow(self.maps.put, self._stop, known_revision)
            finally:
                await store.close()

        try:
            self._loop.run_until_complete(follow())
        except Exception as exc:           # reported in the status, never raised in the loop
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._loop.close()

    def drain(self) -> list[Stored]:
        out = []
        while True:
            try:
                out.append(self.maps.get_nowait())
            except queue.Empty:
                return out

    def close(self, wait: float = 2.0) -> None:
        if self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:           # the loop closed meanwhile: the thread is ending
                pass
            self._thread.join(wait)
