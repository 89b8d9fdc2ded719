"""The thin UDP shell of the sync channel, and a standalone secondary.

`UdpSync` moves a `Replicator`'s datagrams over one UDP socket (peers by
name -> address). `python -m dataplane.shells.syncudp` runs a secondary instance in
its own process: it receives and applies mirrored flows until it has been
idle for `--idle` seconds, then prints a JSON line with the digest of its
replica table, so a test or an operator can compare both ends.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import selectors
import socket
import sys
import time
from collections.abc import Callable, Iterable

from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate
from dataplane.core.liveness import FailureDetector
from dataplane.core.node import ServiceNode
from dataplane.core.replicator import Out, Replicator, SyncSend
from dataplane.core.servicemap import ServiceMap
from dataplane.core.services import create
from dataplane.core.syncchannel import SyncConfig


class UdpSync:
    """One UDP socket carrying a replicator's sync datagrams."""

    def __init__(self, rep: Replicator, bind: tuple[str, int],
                 peers: dict[str, tuple[str, int]],
                 send: Callable[[bytes, tuple[str, int]], None] | None = None) -> None:
        self.rep = rep
        self.peers = peers
        self.send = send
        """Replaces the plain sendto (the lab's forwarder impairs through it)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.sock.setblocking(False)
        self.sent = self.send_errors = 0

    def emit(self, outs: list[Out]) -> list[Out]:
        """Send the sync datagrams among `outs`; return the rest in order."""
        rest = []
        for o in outs:
            if isinstance(o, SyncSend):
                addr = self.peers.get(o.peer)
                if addr is None:
                    self.send_errors += 1
                    continue
                try:
                    if self.send is not None:
                        self.send(o.data, addr)
                    else:
                        self.sock.sendto(o.data, addr)
                    self.sent += 1
                except OSError:
                    self.send_errors += 1
            else:
                rest.append(o)
        return rest

    def drain(self, now: float, limit: int = 1024,
              on_error: Callable[[Exception], None] | None = None) -> list[Out]:
        """Read what is waiting on the socket (bounded) and process it. With
        `on_error`, an exception while processing one datagram is handed to
        it and costs only that datagram."""
        out: list[Out] = []
        for _ in range(limit):
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                break
            if on_error is None:
                out.extend(self.rep.receive(data, now))
                continue
            try:
                out.extend(self.rep.receive(data, now))
            except Exception as exc:
                on_error(exc)
        return out

    def close(self) -> None:
        self.sock.close()


def digest(updates: Iterable[FlowUpdate]) -> str:
    """Order-independent digest of flow states (key, version, state)."""
    h = hashlib.sha256()
    for u in sorted(updates, key=lambda u: u.key):
        h.update(repr(u.key).encode() + u.version.to_bytes(8, "big") + u.state)
    return h.hexdigest()


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port free right now on `host` (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--map", required=True, help="service map JSON file")
    ap.add_argument("--me", required=True)
    ap.add_argument("--service", default="firewall", help="service kind")
    ap.add_argument("--listen", required=True, type=parse_addr)
    ap.add_argument("--peer", action="append", default=[], help="NAME=HOST:PORT")
    ap.add_argument("--key", default="0123456789abcdef0123456789abcdef")
    ap.add_argument("--idle", type=float, default=1.0)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--misses", type=int, default=4,
                    help="silent heartbeat intervals before the peer is declared dead")
    args = ap.parse_args(argv)
    with open(args.map) as f:
        smap = ServiceMap.from_json(f.read())
    node = ServiceNode(args.me, smap, create(args.service))
    config = SyncConfig()
    rep = Replicator(node, sw.Keyring({1: args.key.encode()}, 1), time.time_ns() // 1000, config=config,
                     detector=FailureDetector(config.heartbeat, args.misses))
    peers = {p.split("=")[0]: parse_addr(p.split("=")[1]) for p in args.peer}
    shell = UdpSync(rep, args.listen, peers)
    sel = selectors.DefaultSelector()
    sel.register(shell.sock, selectors.EVENT_READ)
    start = last = time.monotonic()
    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() - start < args.max_seconds:
        sel.select(timeout=rep.config.heartbeat / 2)
        now = time.monotonic()
        before = rep.node.counters["updates_applied"]
        shell.emit(shell.drain(now))
        shell.emit(rep.tick(now))
        if rep.node.counters["updates_applied"] != before:
            last = now
        if now - last > args.idle and rep.node.counters["updates_applied"]:
            break
    replicas = [node.update_of(e) for e in node.flows if e.replica]
    print(json.dumps({"flows": len(replicas), "digest": digest(replicas),
                      "applied": rep.node.counters["updates_applied"],
                      "rejected": {p: dict(ch.rejected) for p, ch in rep.channels.items()}}),
          flush=True)
    shell.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
