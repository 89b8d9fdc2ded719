"""The service map in etcd v3, through the `aetcd` gRPC client.

The decisions (fencing, the compare-and-swap, when to read, resume or
re-read) are `dataplane.core.mapstore`'s; this module only talks to etcd:

* `read` is a linearizable range of the one map key (``get_range`` over
  ``[key, key + NUL)``, so an absent key still answers with the store's
  header revision, which says up to where the answer is current);
* `write` is one transaction: *if* the key's ``mod_revision`` equals the
  revision the new map was computed from (0: no key yet) *then* put it and
  read it back (the read gives the put's revision), *else* read it (the
  winner's map, for the loser to adopt);
* `follow` runs the `Follower` state machine: it watches the key from a
  start revision (inclusive); when the stream or the connection breaks
  (aetcd ends the watch iterator with a `ClientError`) it waits the
  machine's back-off and watches again, from the last revision seen + 1, on
  the next endpoint; when etcd answers that the start revision is compacted
  away (`RevisionCompactedError`, at the watch's creation or on a running
  watch) it reads the key afresh and watches from the read's header
  revision + 1. Every map goes through the fence, so none older than the
  one installed is ever handed to `install`.

aetcd talks to one endpoint per client, so there is one client per
endpoint, made on first use. A silently dead or partitioned member (no
RST, no FIN) would hold a watch that never ends and never delivers: while
a watch runs, a probe reads the key from the same member every
`PROBE_EVERY` seconds (a linearizable read, which a member cut off from the
majority cannot answer), and a probe unanswered within `PROBE_TIMEOUT` ends
the watch as broken, so it resumes on the next endpoint from the last
revision seen + 1 and nothing written meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable

import aetcd
from aetcd import exceptions as etcd_errors

from dataplane.core.mapstore import (MAP_KEY, Broken, CasResult, Compacted, DoRead, DoWatch, Event,
                                     Fence, Follower, Install, Pause, Read, Said, Stored, cas, cas_result)

ENDPOINT = re.compile(r"^http://(?P<host>[^:/]+):(?P<port>[0-9]{1,5})$")
TIMEOUT = 2.0
"""Seconds a read, a write or a watch's creation may take."""
PROBE_EVERY = 0.5
PROBE_TIMEOUT = 1.0
"""A watched member that does not answer a read within this is left."""


def parse_endpoint(url: str) -> tuple[str, int]:
    """``http://10.0.0.1:2379`` -> (host, port); ValueError if not like that."""
    m = ENDPOINT.match(url)
    if m is None or not 1 <= int(m["port"]) <= 65535:
        raise ValueError(f"{url!r} is not http://HOST:PORT")
    return m["host"], int(m["port"])


class EtcdMapStore:
    """The map key ``<prefix>/map`` on an etcd cluster."""

    def __init__(self, endpoints: list[str], prefix: str = "/amesh", timeout: float = TIMEOUT) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.key = f"{prefix.rstrip('/')}/{MAP_KEY}".encode()
        self.timeout = timeout
        self._clients: dict[int, aetcd.Client] = {}

    def client(self, endpoint: int = 0) -> aetcd.Client:
        c = self._clients.get(endpoint)
        if c is None:
            host, port = self.endpoints[endpoint]
            c = self._clients[endpoint] = aetcd.Client(host=host, port=port, timeout=self.timeout)
        return c

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    async def read(self, endpoint: int = 0) -> Read:
        """The map and its revision (None: no map yet), at the store's revision."""
        r = await self.client(endpoint).get_range(self.key, self.key + b"\x00")
        stored = Stored(r.kvs[0].value, r.kvs[0].mod_revision) if r.kvs else None
        return Read(stored, r.header.revision)

    async def write(self, value: bytes, computed_from: int, endpoint: int = 0) -> CasResult:
        """Store `value` if the map is still at revision `computed_from`."""
        txn = cas(self.key.decode(), value, computed_from)
        c = self.client(endpoint)
        t = c.transactions
        ok, responses = await c.transaction(
            compare=[t.mod(self.key) == txn.expect],
            success=[t.put(self.key, value), t.get(self.key)],
            failure=[t.get(self.key)])
        got = responses[-1]
        current = Stored(got[0][1].value, got[0][1].mod_revision) if got else None
        return cas_result(txn, ok, current.revision if ok and current else 0, current)

    async def follow(self, install: Callable[[Stored], None], stop: asyncio.Event,
                     known_revision: int = 0, fence: Fence | None = None) -> Follower:
        """Hand every newer map to `install` until `stop` is set; returns the
        follower (its counters say how many resumes, compactions, refusals).

        `known_revision`: the revision of the map the node has from this
        store (watch from the next); `fence`: the node's fence when maps
        also reach it another way (a controller's push), so a map from
        either source is installed only if newer than both."""
        f = Follower(endpoints=len(self.endpoints), fence=fence or Fence())
        todo = deque(f.start(known_revision))
        while todo and not stop.is_set():
            action = todo.popleft()
            if isinstance(action, Install):
                install(action.stored)
            elif isinstance(action, Pause):
                try:
                    await asyncio.wait_for(stop.wait(), action.seconds)
                except TimeoutError:
                    pass
            elif isinstance(action, DoRead):
                try:
                    said: Said = await self.read(action.endpoint)
                except etcd_errors.ClientError:
                    said = Broken()
                todo.extend(f.on(said))
            elif isinstance(action, DoWatch):
                ended = await self._watch(f, action, install, stop)
                if ended is not None:
                    todo.extend(f.on(ended))
        return f

    async def _watch(self, f: Follower, action: DoWatch, install: Callable[[Stored], None],
                     stop: asyncio.Event) -> Said | None:
        """Run one watch stream; how it ended (None: `stop` was set)."""
        try:
            w = await self.client(action.endpoint).watch(self.key, start_revision=action.start_revision)
        except etcd_errors.RevisionCompactedError as exc:
            return Compacted(exc.compacted_revision)
        except etcd_errors.ClientError:
            return Broken()
        stopper = asyncio.ensure_future(stop.wait())
        stopper.add_done_callback(lambda fut: fut.cancelled() or asyncio.ensure_future(w.cancel()))
        prober = asyncio.ensure_future(self._probe(action.endpoint))
        prober.add_done_callback(lambda fut: fut.cancelled() or asyncio.ensure_future(w.cancel()))
        try:
            async for ev in w:
                kv = ev.kv
                value = kv.value if ev.kind == aetcd.rtypes.EventKind.PUT else None
                for a in f.on(Event(value, kv.mod_revision)):
                    if isinstance(a, Install):
                        install(a.stored)
        except etcd_errors.RevisionCompactedError as exc:
            return Compacted(exc.compacted_revision)
        except etcd_errors.ClientError:
            return Broken()
        finally:
            stopper.cancel()
            prober.cancel()
        return None if stop.is_set() else Broken()

    async def _probe(self, endpoint: int) -> None:
        """Return (ending the watch) once `endpoint` leaves a read unanswered."""
        while True:
            await asyncio.sleep(PROBE_EVERY)
            try:
                await asyncio.wait_for(self.read(endpoint), PROBE_TIMEOUT)
            except (etcd_errors.ClientError, asyncio.TimeoutError):
                return
