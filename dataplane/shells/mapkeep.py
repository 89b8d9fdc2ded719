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
  winner's revision learnt: one controller stays the writer; several
  controllers adopting the winner's map is the shared-controller work.

Both raise `KeepError` when the map could not be kept; the shell counts it
and forwarding goes on with the map in memory. `Retrying` wraps either and
remembers the newest map it refused, for the shell to try again: a write
that fell into an etcd leader election would otherwise leave the store one
map behind until the next failure. The etcd client (gRPC) is
imported only by a controller that uses etcd: the forwarders never load it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

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

    def close(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.loop.close()
