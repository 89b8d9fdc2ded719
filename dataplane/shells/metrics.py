"""Prometheus metrics of one lab node, read from the counters it already keeps.

Nothing here is on the packet path: `NodeCollector` is a prometheus_client
custom collector that, at scrape time, reads the node's own counters (the
core node's `counters` and `drops`, the flow table's, the replicator's and
each sync channel's, the controller's) and turns them into metric families.
The forwarder serves them itself (`MetricsServer`, from its selector loop:
no thread touches the core's objects while the loop changes them) on its
fabric address, port `[observability] metrics_port` (default 9469).
prometheus_client's multiprocess mode does not support custom collectors,
which is why each process serves its own.

Conventions: one prefix (`amesh_`), base units (bytes, seconds), counters
end in `_total`, every family carries `node`; no per-flow label (`peer` and
`member` name instances, bounded by the topology; not `instance`,
which Prometheus gives the scrape target). Drop and refusal
reasons are the documented values of `dataplane.core.reasons`. The README's
metric table lists every family `FAMILIES` names; a test holds the two to
each other and to what a collector really yields.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from dataplane.core.liveness import Health
from dataplane.core.reasons import drop_reason, refusal_reason
from dataplane.core.servicemap import InstanceState

P = "amesh_"
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # name (counters without _total): (type, help, labels beside `node`)
    "packets": ("counter", "Dataplane packets received (rx) and sent (tx) on the fabric or host link",
                ("service", "link", "direction")),
    "bytes": ("counter", "Bytes of those packets (affinity header and inner packet on the fabric, "
              "IP packet on the host link)", ("service", "link", "direction")),
    "drops": ("counter", "Packets dropped, by documented reason", ("service", "reason")),
    "flows": ("gauge", "Flows in the flow table, by role (primary: this instance serves it; "
              "replica: mirrored here)", ("service", "role")),
    "flows_created": ("counter", "Flow table entries created (new flows and new replicas)", ("service",)),
    "flows_removed": ("counter", "Flow table entries removed, by cause", ("service", "cause")),
    "flow_lookups": ("counter", "Flow table lookups of packets, by result", ("service", "result")),
    "flows_promoted": ("counter", "Replicas promoted to primary by a new map (failover)", ("service",)),
    "flows_taken_over": ("counter", "Promoted flows whose first packet this instance served", ("service",)),
    "flows_lost": ("counter", "Flows whose state died with their primary and secondary: a mid-stream "
                   "packet found no state in a bucket this instance took over from them (each counted once)",
                   ("service",)),
    "packets_rerouted": ("counter", "Packets sent to a new primary because their pinned hop died",
                         ("service",)),
    "packets_resent": ("counter", "Packets sent again to a new primary from the resend buffer",
                       ("service",)),
    "map_epoch": ("gauge", "Epoch of the service map this node holds", ()),
    "map_revision": ("gauge", "Revision of the map store (the embedded store writes once per epoch)", ()),
    "serving": ("gauge", "1 while the node serves, 0 after the map declared it dead", ()),
    "in_sync": ("gauge", "1 when every sync peer holds all this instance mirrored to it", ("service",)),
    "sync_records_sent": ("counter", "Sync records sent (updates, deletes, bulk markers)", ("service", "peer")),
    "sync_records_received": ("counter", "Sync records received in order", ("service", "peer")),
    "sync_records_applied": ("counter", "Mirrored flow updates applied to the flow table", ("service",)),
    "sync_records_stale": ("counter", "Mirrored updates ignored: not newer than the state held", ("service",)),
    "sync_records_resent": ("counter", "Sync records retransmitted (NACK or timeout)", ("service", "peer")),
    "sync_refused": ("counter", "Sync datagrams refused, by documented reason", ("service", "peer", "reason")),
    "sync_unacked_records": ("gauge", "Sync records sent and not yet acknowledged", ("service", "peer")),
    "sync_oldest_unacked_age_seconds": ("gauge", "Age of the oldest unacknowledged sync record "
                                        "(replication lag)", ("service", "peer")),
    "sync_bulk_flows_sent": ("gauge", "Flows sent by the bulk syncs in progress", ("service", "peer")),
    "sync_bulk_flows": ("gauge", "Flows to send by the bulk syncs in progress", ("service", "peer")),
    "sync_bulks_started": ("counter", "Bulk syncs started", ("service", "peer")),
    "sync_bulks_completed": ("counter", "Bulk syncs acknowledged to the end", ("service", "peer")),
    "sync_peer_in_sync": ("gauge", "1 when the peer holds all this instance mirrored to it", ("service", "peer")),
    "sync_peer_up": ("gauge", "1 while the peer's sync heartbeats are heard", ("service", "peer")),
    "instance_up": ("gauge", "Controller's failure detector: 1 alive, 0 dead or not heard",
                    ("service", "member")),
    "instance_state": ("gauge", "Controller's map: 1 for the instance's state", ("service", "member", "state")),
    "instance_held_epoch": ("gauge", "Map epoch the instance last reported holding", ("service", "member")),
    "failovers": ("counter", "Instances the controller declared dead and took out of the map", ()),
    "map_epochs_published": ("counter", "Map epochs the controller published", ()),
    "control_refused": ("counter", "Control datagrams refused, by documented reason", ("reason",)),
}
"""Every metric family, as the README's table lists it."""

REMOVAL_CAUSES = ("evicted_embryonic", "evicted_established", "expired", "deleted", "deleted_by_peer", "discarded_declared_dead")


class NodeCollector:
    """Reads a forwarder's counters at scrape time (a prometheus_client
    custom collector). `fwd` is a `dataplane.shells.forwarder.Forwarder`, or
    anything with the same attributes (the tests build one from the core)."""

    def __init__(self, fwd: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.fwd = fwd
        self.clock = clock

    def _family(self, name: str) -> Metric:
        kind, doc, labels = FAMILIES[name]
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        return cls(P + name, doc, labels=["node", *labels])

    def collect(self) -> Iterator[Metric]:
        fwd, me = self.fwd, self.fwd.name
        fams = {n: self._family(n) for n in FAMILIES}
        fams["map_epoch"].add_metric([me], fwd.map.epoch)
        if fwd.role == "controller":
            yield from self._controller(fams)
            return
        node = fwd.node
        svc = getattr(node, "service_name", fwd.role)
        c, ft = node.counters, node.flows.counters
        fams["serving"].add_metric([me], int(fwd.serving))
        for (link, direction), (packets, nbytes) in sorted(fwd.io.items()):
            fams["packets"].add_metric([me, svc, link, direction], packets)
            fams["bytes"].add_metric([me, svc, link, direction], nbytes)
        drops: dict[str, int] = {}
        for counter, n in node.drops.items():
            reason = drop_reason(counter)
            drops[reason] = drops.get(reason, 0) + n
        for reason, n in sorted(drops.items()):
            fams["drops"].add_metric([me, svc, reason], n)
        replicas = node.flows.replicas
        fams["flows"].add_metric([me, svc, "primary"], len(node.flows) - replicas)
        fams["flows"].add_metric([me, svc, "replica"], replicas)
        fams["flows_created"].add_metric([me, svc], ft["inserted"])
        for cause in REMOVAL_CAUSES:
            fams["flows_removed"].add_metric([me, svc, cause], ft[cause])
        fams["flow_lookups"].add_metric([me, svc, "hit"], ft["hits"])
        fams["flow_lookups"].add_metric([me, svc, "miss"], ft["misses"])
        for fam, counter in (("flows_promoted", "promoted"), ("flows_taken_over", "took_over"),
                             ("flows_lost", "flows_lost"), ("packets_rerouted", "rerouted")):
            fams[fam].add_metric([me, svc], c[counter])
        fams["packets_resent"].add_metric([me, svc], fwd.resend.resent)
        if fwd.rep is not None:
            self._sync(fams, me, svc)
        yield from (f for f in fams.values() if f.samples)

    def _sync(self, fams: dict[str, Metric], me: str, svc: str) -> None:
        rep, node, now = self.fwd.rep, self.fwd.node, self.clock()
        fams["sync_records_applied"].add_metric([me, svc], node.counters["updates_applied"])
        fams["sync_records_stale"].add_metric([me, svc], node.counters["stale_updates"])
        all_in_sync = True
        for peer, ch in sorted(rep.channels.items()):
            st, lab = ch.stats, [me, svc, peer]
            fams["sync_records_sent"].add_metric(lab, st["records_sent"])
            fams["sync_records_received"].add_metric(lab, st["records_received"])
            fams["sync_records_resent"].add_metric(lab, st["retransmitted"])
            refused: dict[str, int] = {}
            for counter, n in ch.rejected.items():
                reason = refusal_reason(counter)
                refused[reason] = refused.get(reason, 0) + n
            for reason, n in sorted(refused.items()):
                fams["sync_refused"].add_metric([*lab, reason], n)
            snap = ch.snapshot(now)
            fams["sync_unacked_records"].add_metric(lab, snap["resend_queue"])
            fams["sync_oldest_unacked_age_seconds"].add_metric(lab, ch.lag(now))
            fams["sync_bulk_flows_sent"].add_metric(lab, sum(b["sent"] for b in snap["bulks"]))
            fams["sync_bulk_flows"].add_metric(lab, sum(b["total"] for b in snap["bulks"]))
            fams["sync_bulks_started"].add_metric(lab, st["bulk_started"])
            fams["sync_bulks_completed"].add_metric(lab, st["bulk_done"])
            in_sync = bool(snap["in_sync"])
            all_in_sync = all_in_sync and in_sync
            fams["sync_peer_in_sync"].add_metric(lab, int(in_sync))
            fams["sync_peer_up"].add_metric(lab, int(rep.detector.health(peer) == Health.ALIVE))
        if rep.counters["unknown_sender"]:
            fams["sync_refused"].add_metric([me, svc, "", "unknown_sender"], rep.counters["unknown_sender"])
        fams["in_sync"].add_metric([me, svc], int(all_in_sync))

    def _controller(self, fams: dict[str, Metric]) -> Iterator[Metric]:
        ctl, me = self.fwd.ctl, self.fwd.name
        m = ctl.map
        fams["map_revision"].add_metric([me], m.epoch)
        for svc, insts in m.services.items():
            for name, inst in insts.items():
                if name not in ctl.members:
                    continue
                up = int(ctl.detector.health(name) == Health.ALIVE)
                fams["instance_up"].add_metric([me, svc, name], up)
                for state in InstanceState:
                    fams["instance_state"].add_metric([me, svc, name, state.value], int(inst.state == state))
                fams["instance_held_epoch"].add_metric([me, svc, name], ctl.held.get(name, 0))
        fams["failovers"].add_metric([me], ctl.counters["failovers"])
        fams["map_epochs_published"].add_metric([me], ctl.counters["epochs"])
        refused: dict[str, int] = {}
        for counter, n in ctl.endpoint.rejected.items():
            reason = refusal_reason(counter)
            refused[reason] = refused.get(reason, 0) + n
        for reason, n in sorted(refused.items()):
            fams["control_refused"].add_metric([me, reason], n)
        yield from (f for f in fams.values() if f.samples)


def registry_for(fwd: Any, clock: Callable[[], float] = time.monotonic) -> CollectorRegistry:
    """A registry holding only the node's collector (no process or GC
    collectors: the families are the table's, nothing else)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(fwd, clock))
    return reg


MAX_REQUEST = 8192
MAX_CLIENTS = 8
IDLE = 2.0
"""A scrape connection that has not sent its request or taken its answer
within this long is closed."""


class MetricsServer:
    """A minimal HTTP/1.1 server for `GET /metrics` on the node's selector
    loop: non-blocking accept, read, write, one request per connection.
    The loop's other sockets never wait for a slow scraper; the body is
    generated in the loop's thread, so the collector reads counters no one
    is changing."""

    def __init__(self, sel: Any, addr: tuple[str, int], registry: CollectorRegistry,
                 on_scrape: Callable[[float], None] | None = None) -> None:
        self.sel, self.registry = sel, registry
        self.on_scrape = on_scrape
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.sock.listen(MAX_CLIENTS)
        self.sock.setblocking(False)
        self.clients: dict[socket.socket, list[Any]] = {}
        """conn -> [request bytes, response bytes left, deadline]."""
        self.scrapes = 0
        sel.register(self.sock, 1, self._accept)  # selectors.EVENT_READ

    def _accept(self, sock: socket.socket, now: float) -> None:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, OSError):
            return
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()
            return
        conn.setblocking(False)
        self.clients[conn] = [b"", b"", now + IDLE]
        self.sel.register(conn, 1, self._read)

    def _read(self, conn: socket.socket, now: float) -> None:
        st = self.clients[conn]
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)
            return
        st[0] += chunk
        if b"\r\n\r\n" not in st[0]:
            if len(st[0]) > MAX_REQUEST:
                self._respond(conn, st, "431 Request Header Fields Too Large", b"")
            return
        line = st[0].split(b"\r\n", 1)[0].split()
        if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
            self._respond(conn, st, "405 Method Not Allowed", b"")
        elif line[1].split(b"?")[0] != b"/metrics":
            self._respond(conn, st, "404 Not Found", b"try /metrics\n")
        else:
            t0 = time.perf_counter()
            body = generate_latest(self.registry)
            self.scrapes += 1
            if self.on_scrape is not None:
                self.on_scrape(time.perf_counter() - t0)
            self._respond(conn, st, "200 OK", b"" if line[0] == b"HEAD" else body)

    def _respond(self, conn: socket.socket, st: list[Any], status: str, body: bytes) -> None:
        head = (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        st[1] = head + body
        self.sel.modify(conn, 2, self._write)  # selectors.EVENT_WRITE
        self._write(conn, 0.0)

    def _write(self, conn: socket.socket, now: float) -> None:
        st = self.clients.get(conn)
        if st is None:
            return
        try:
            sent = conn.send(st[1])
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        st[1] = st[1][sent:]
        if not st[1]:
            self._close(conn)

    def expire(self, now: float) -> None:
        """Close connections past their deadline (called from the loop's tick)."""
        for conn in [c for c, st in self.clients.items() if now > st[2]]:
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        self.clients.pop(conn, None)
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()
