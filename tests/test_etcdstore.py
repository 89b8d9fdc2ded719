"""The map store against a real etcd (Debian's etcd-server): one member on
loopback, random free ports, its data directory in tmp_path."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from aetcd import exceptions as etcd_errors

from dataplane.core.mapstore import Fence, Stored
from dataplane.shells.etcdstore import PROBE_EVERY, PROBE_TIMEOUT, EtcdMapStore, parse_endpoint

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="etcd is not installed (apt-get install etcd-server)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member: started, killed and restarted by PID, on the same
    ports and data directory."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "etcd"
        self.client, self.peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer}"
        log = open(self.dir.parent / "etcd.log", "ab")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "m1", "--data-dir", str(self.dir),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"m1={peer}"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("etcd did not become healthy in 20 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def etcd(tmp_path):
    e = Etcd(tmp_path)
    e.start()
    yield e
    e.kill()
    shutil.rmtree(e.dir, ignore_errors=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_endpoints_are_parsed():
    assert parse_endpoint("http://10.0.0.1:2379") == ("10.0.0.1", 2379)
    for bad in ("10.0.0.1:2379", "http://10.0.0.1", "http://10.0.0.1:0", "https://x:1"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)
    with pytest.raises(ValueError):
        EtcdMapStore([])


def test_read_write_and_cas_conflict(etcd):
    """Two writers computed from the same revision: exactly one wins, the
    other learns the winner's map and revision from its failed write."""
    async def go():
        a, b = EtcdMapStore([etcd.url], "/t"), EtcdMapStore([etcd.url], "/t")
        empty = await a.read()
        assert empty.stored is None and empty.header_revision >= 1
        first = await a.write(b"m1", 0)
        assert first.won and first.stored.value == b"m1"
        assert (await b.write(b"late", 0)).stored == first.stored     # a first map exists already
        base = (await b.read()).stored
        assert base == first.stored
        ra, rb = await asyncio.gather(a.write(b"from-a", base.revision), b.write(b"from-b", base.revision))
        assert [ra.won, rb.won].count(True) == 1
        winner, loser = (ra, rb) if ra.won else (rb, ra)
        assert loser.stored == winner.stored and winner.stored.revision > base.revision
        assert (await a.read()).stored == winner.stored
        await a.close()
        await b.close()
    run(go())


async def until_connected(call):
    """A writer's call, retried while gRPC reconnects to a restarted etcd."""
    for _ in range(100):
        try:
            return await call()
        except etcd_errors.ConnectionFailedError:
            await asyncio.sleep(0.1)
    raise AssertionError("no connection to etcd in 10 s")


def follow_until(store, want, stop, got, known=0):
    """Start following; return the task."""
    def install(s: Stored) -> None:
        got.append(s)
        if want(s):
            stop.set()
    return asyncio.ensure_future(store.follow(install, stop, known))


async def following(etcd, prefix: str, last: bytes):
    """A writer that stored v1 and a follower that has installed it, which
    follows until it installs `last`: (writer, v1's write, follower, its
    task, what it installed)."""
    w = EtcdMapStore([etcd.url], prefix)
    r1 = await w.write(b"v1", 0)
    got: list[Stored] = []
    reader = EtcdMapStore([etcd.url], prefix)
    task = follow_until(reader, lambda s: s.value == last, asyncio.Event(), got)
    while not got:
        await asyncio.sleep(0.02)
    return w, r1, reader, task, got


def test_watch_resumes_after_etcd_restarts_and_misses_nothing(etcd):
    """The stream breaks (etcd killed and restarted); the follower watches
    again from its last revision + 1: it gets every map written meanwhile,
    in order, and never goes back."""
    async def go():
        w, r1, reader, task, got = await following(etcd, "/t", b"v4")
        r2 = await w.write(b"v2", r1.stored.revision)
        while len(got) < 2:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(etcd.kill)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(etcd.start)
        r3 = await until_connected(lambda: w.write(b"v3", r2.stored.revision))
        await w.write(b"v4", r3.stored.revision)
        f = await task
        revs = [s.revision for s in got]
        assert [s.value for s in got] == [b"v1", b"v2", b"v3", b"v4"] and revs == sorted(set(revs))
        assert f.counters["resumes"] >= 1
        await w.close()
        await reader.close()
    run(go())


def test_a_watched_member_that_stops_answering_is_left_and_nothing_is_missed(etcd):
    """A member frozen (SIGSTOP: no RST, no FIN, the stream just goes
    silent) fails the watch's read probe, so the watch ends as broken and
    resumes (from the last revision + 1) instead of waiting for ever; the
    map written once the member answers again arrives."""
    async def go():
        w, r1, reader, task, got = await following(etcd, "/p", b"v2")
        os.kill(etcd.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(PROBE_EVERY + PROBE_TIMEOUT + 0.5)
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        await until_connected(lambda: w.write(b"v2", r1.stored.revision))
        f = await task
        assert [s.value for s in got] == [b"v1", b"v2"]
        assert f.counters["resumes"] >= 1
        await w.close()
        await reader.close()
    run(go())


def test_compaction_re_reads_then_re_watches_and_never_goes_back(etcd):
    """A node that has the map at an old revision starts watching from it
    after the store compacted past it: the watch is refused as compacted,
    the follower re-reads (the newest map), re-watches, and follows on."""
    async def go():
        w = EtcdMapStore([etcd.url], "/t")
        old = (await w.write(b"v1", 0)).stored
        last = old
        for n in range(2, 6):
            last = (await w.write(f"v{n}".encode(), last.revision)).stored
        await w.client().compact(last.revision)
        got: list[Stored] = []
        stop = asyncio.Event()
        reader = EtcdMapStore([etcd.url], "/t")
        task = follow_until(reader, lambda s: s.value == b"v6", stop, got, known=old.revision)
        while not got:
            await asyncio.sleep(0.02)
        assert got == [last]
        await w.write(b"v6", last.revision)
        f = await task
        assert [s.value for s in got] == [b"v5", b"v6"]
        assert f.counters["compactions"] == 1 and f.counters["reads"] == 1
        await w.close()
        await reader.close()
    run(go())


def test_revision_fencing_refuses_an_older_map(etcd):
    """A node that already has a newer map (pushed by a controller at a
    revision this follower has not seen yet) installs nothing older from
    the store, neither read nor watched, and then the first newer one."""
    async def go():
        w = EtcdMapStore([etcd.url], "/t")
        cur = (await w.write(b"v1", 0)).stored
        got: list[Stored] = []
        stop = asyncio.Event()
        reader = EtcdMapStore([etcd.url], "/t")
        ahead = cur.revision + 2
        task = asyncio.ensure_future(reader.follow(lambda s: (got.append(s), stop.set()), stop,
                                                   fence=Fence(ahead)))
        await asyncio.sleep(0.3)                                  # read v1: refused
        cur = (await w.write(b"v2", cur.revision)).stored       # ahead - 1: refused
        cur = (await w.write(b"v3", cur.revision)).stored       # == ahead: refused
        assert cur.revision == ahead
        cur = (await w.write(b"v4", cur.revision)).stored       # newer: installed
        f = await task
        assert got == [cur] and f.fence.installed == cur.revision and f.counters["refused"] == 3
        await w.close()
        await reader.close()
    run(go())


def test_a_dead_endpoint_is_left_for_the_next(etcd):
    """The first endpoint answers nothing (a closed port): the read fails,
    the follower backs off and reads from the next one."""
    async def go():
        w = EtcdMapStore([etcd.url], "/t")
        cur = (await w.write(b"v1", 0)).stored
        got: list[Stored] = []
        stop = asyncio.Event()
        reader = EtcdMapStore([f"http://127.0.0.1:{free_port()}", etcd.url], "/t", timeout=0.5)
        f = await reader.follow(lambda s: (got.append(s), stop.set()), stop)
        assert got == [cur] and f.counters["resumes"] == 1 and f.endpoint == 1
        await w.close()
        await reader.close()
    run(go())
