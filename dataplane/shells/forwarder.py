"""One lab node's process: the I/O shell around the sans-I/O core.

Started inside the node's namespace by `amesh lab up`
(``python -m dataplane.shells.forwarder --topology FILE --node NAME --run-dir DIR``).
By role:

* **controller**: `dataplane.core.control.Controller` on the control socket;
* **ingress**: an AF_PACKET socket on the hosts bridge (kernel BPF: IPv4
  and IPv6; forwarding is off in the namespace, so the kernel does not route
  these packets itself) feeding `IngressNode`; replies from the fabric are
  written back as Ethernet frames to the client's MAC. What is the link's
  own business (`dataplane.core.packet.link_local`: ARP'd traffic to the
  edge's own addresses, broadcast and multicast, IPv6 neighbour discovery
  and link-local addresses) is left to the namespace's kernel, which
  answers it: the socket reads a copy, and the edge does not carry it. With `[fabric] gso`
  the socket has PACKET_VNET_HDR: the host's TCP super-frames (up to 60 KB)
  arrive whole with the kernel's virtio_net_hdr, which rides the affinity
  header as a GSO option to the far edge, where the frame is written back
  with it and the kernel segments it (or hands it whole to the host's TCP);
* **egress**: the same on the server side with `EgressNode`;
* **instance**: `ServiceNode` + `Replicator` (sync socket) on the fabric.

Fabric packets are UDP datagrams to port 6886 of the next hop's fabric
address: the kernel builds the outer IP/UDP, so captures show
IP/UDP/Affinity/IP/... on every hop. They are received and sent in batches
of up to 64 with recvmmsg/sendmmsg (`dataplane.shells.mmsg`); the replicator
orders a whole batch at once, so `ordered` costs one sync flush per batch.
Every forwarder heartbeats the controller (from a child process, see
`Forwarder._start_heartbeats`) and installs the maps it pushes.

A Unix socket ``<run-dir>/<node>.sock`` answers one-line JSON queries
(status, flows, map, resync, keys) for `amesh lab status`, `amesh flows`,
`amesh lab rotate-key`, ...

One bad input never stops the process: an exception while handling one
packet, sync datagram, control message or query (or in a tick) is caught by
the loop, counted in `internal_error` by handler (status shows it), logged
with its traceback at most once a second per handler, and the loop carries
on; a batch loses only the packet that raised. Fabric packets from an
address that is no node of the map are dropped (`not_a_node`).
"""

from __future__ import annotations

import argparse
import ctypes
import heapq
import json
import mmap
import os
import random
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from dataplane.core import header as wire
from dataplane.core import syncwire as sw
from dataplane.core.affinity import AffinityHasher
from dataplane.core.control import (ControlClient, Controller, ControlSend, MapPublished, MapReceived,
                                    not_ready, standing)
from dataplane.core.events import Deliver, Persist, Propose, Send, TookOver
from dataplane.core.header import UDP_PORT
from dataplane.lab import keyrot
from dataplane.lab.topology import MAX_PEERS, Topology, load
from dataplane.core.liveness import Declared, FailureDetector
from dataplane.shells.mapkeep import Conflict, Following, KeepError, keeper
from dataplane.shells.metrics import MetricsServer, registry_for
from dataplane.shells.mmsg import BatchReceiver, BatchSender
from dataplane.core.node import EgressNode, IngressNode, ServiceNode
from dataplane.core.packet import link_local
from dataplane.core.replicator import Policy, Replicator
from dataplane.core.resend import ResendBuffer
from dataplane.core.servicemap import ServiceMap
from dataplane.core.services import create
from dataplane.core.syncchannel import SyncConfig
from dataplane.shells.syncudp import UdpSync

ETH_P_ALL, ETH_P_IP, ETH_P_IPV6 = 0x0003, 0x0800, 0x86DD
ETHERTYPE = {4: b"\x08\x00", 6: b"\x86\xdd"}
SOL_PACKET, PACKET_VNET_HDR = 263, 15
VNET_HDR = struct.Struct("=BBHHHH")
"""struct virtio_net_hdr, in host byte order: flags, gso_type, hdr_len,
gso_size, csum_start, csum_offset."""
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
BPF_IP = [(0x28, 0, 0, 12), (0x15, 1, 0, ETH_P_IP), (0x15, 0, 1, ETH_P_IPV6), (0x06, 0, 0, 0x40000),
          (0x06, 0, 0, 0)]
"""ldh [12]; jeq #0x800 (accept); jeq #0x86dd (accept, else refuse); ret
#262144; ret #0: IPv4 and IPv6 frames only."""
TICK = 0.001
HANG_AFTER = 1.0
"""A forwarder whose loop has not come round for this long stops
heartbeating: a hang is declared after this plus the detection time. A busy
loop alone stalls about 60 ms, but installing a new map (bucket tables: tens
of ms of CPU) on a saturated 2-core machine, at a fifth of a core, took
longer than the former 250 ms: the false hang moved buckets, every node
installed another map, and the failovers cascaded (50 downloads during one
kill: 29 failovers and every download broken at 250 ms, 1 failover and none
broken at 1 s). Crashes are still declared in `misses` heartbeats."""
SYNC_HEARTBEAT = 0.020
"""Keepalive of the sync channels between instances. Failure detection is
the controller's (timers.heartbeat); the channels' own detector only
reports peer health, so it need not cost a datagram per peer every 5 ms
(TCP goodput through the chain, two runs each: 204-222 Mbit/s with the
channels at 5 ms, 220-242 at 20 ms)."""
PREPARE_AFTER = 0.200
"""How long a map must have been quiet before the failure tables are built."""
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
EXPIRE_EVERY = 1.0
HOSTS_BRIDGE = "hbr0"
ERROR_LOG_EVERY = 1.0
"""At most one traceback per handler per this many seconds in the log."""


def log(node: str, msg: str) -> None:
    t = time.time()
    print(f"{time.strftime('%H:%M:%S', time.localtime(t))}.{int(t * 1000) % 1000:03d} {node}: {msg}",
          file=sys.stderr, flush=True)


def realtime() -> None:
    """SCHED_RR for the calling thread (Linux applies it per thread): the
    controller and the heartbeat processes are tiny and must run on time."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
    except (OSError, AttributeError):
        pass


def attach_bpf(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    import ctypes

    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def plain(value: Any) -> Any:
    """A service state as JSON-friendly data. A mutable buffer (an
    inspection stream's history of up to 64 KiB) is shown by its length:
    JSON cannot carry it, and the flows query should not carry that much."""
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, bytearray):
        return len(value)
    return value


class Pulse:
    """What the packet loop tells its heartbeat process, in shared memory:
    the time of its last round, the epoch it holds, its status flags, and
    each controller's incarnation as heard in its pushes (the heartbeats are
    bound to it: `dataplane.core.control.Endpoint`), in the order of
    `Topology.controllers`; and the control key it signs with, which a
    rotation changes after the fork (`set_key`)."""

    CONTROLLERS = 1 + MAX_PEERS
    """The most controllers a topology has (`[controller] peers`)."""
    _LAYOUT = struct.Struct(f"=dQ??{CONTROLLERS}Q")
    _KEY = struct.Struct("=IBB64s")
    """Generation (odd while being written), key id, key length, key (a
    forwarder's pair key is 32 bytes)."""

    def __init__(self) -> None:
        # anonymous, MAP_SHARED: survives fork
        self.mem = mmap.mmap(-1, self._LAYOUT.size + self._KEY.size)

    def write(self, last_round: float, epoch: int, in_sync: bool, declared_dead: bool,
              controllers: list[int]) -> None:
        incs = [*controllers, *[0] * (self.CONTROLLERS - len(controllers))]
        self._LAYOUT.pack_into(self.mem, 0, last_round, epoch, in_sync, declared_dead, *incs)

    def read(self) -> tuple[float, int, bool, bool, tuple[int, ...]]:
        last, epoch, in_sync, dead, *incs = self._LAYOUT.unpack_from(self.mem, 0)
        return last, epoch, in_sync, dead, tuple(incs)

    def set_key(self, kid: int, key: bytes) -> None:
        """Publish the key in use; the generation is odd while it is written,
        so the heartbeat process never signs with half of each key."""
        if len(key) > 64:
            raise ValueError("a control key of a forwarder is at most 64 bytes")
        gen = self._KEY.unpack_from(self.mem, self._LAYOUT.size)[0]
        struct.pack_into("=I", self.mem, self._LAYOUT.size, (gen + 1) & 0xFFFFFFFF)
        self._KEY.pack_into(self.mem, self._LAYOUT.size, (gen + 1) & 0xFFFFFFFF, kid, len(key), key)
        struct.pack_into("=I", self.mem, self._LAYOUT.size, (gen + 2) & 0xFFFFFFFF)

    def key(self) -> tuple[int, bytes]:
        """The key in use, read whole (retried while a write is under way)."""
        while True:
            gen, kid, n, key = self._KEY.unpack_from(self.mem, self._LAYOUT.size)
            if gen % 2 == 0 and struct.unpack_from("=I", self.mem, self._LAYOUT.size)[0] == gen:
                return kid, key[:n]


class Impairment:
    """Userspace netem for the node's fabric and sync sends, for kernels
    without sch_netem: drop with probability `loss`, hold for `delay`
    seconds, and let a `reorder` fraction skip the delay (so it overtakes)."""

    def __init__(self, loss: float = 0.0, delay: float = 0.0, reorder: float = 0.0) -> None:
        self.loss, self.delay, self.reorder = loss, delay, reorder
        self.queue: list[tuple[float, int, socket.socket, bytes, tuple[str, int]]] = []
        self._n = 0
        self._rng = random.Random(1)

    @property
    def active(self) -> bool:
        return bool(self.loss or self.delay or self.reorder)

    @property
    def pending(self) -> bool:
        return bool(self.queue)

    def submit(self, sock: socket.socket, data: bytes, addr: tuple[str, int], now: float) -> None:
        if self._rng.random() < self.loss:
            return
        hold = self.delay
        if self.reorder and self._rng.random() < self.reorder:
            hold = 0.0                      # overtakes what is held
        elif self.reorder and not self.delay:
            hold = 0.002                    # hold the rest so some can overtake
        self._n += 1
        heapq.heappush(self.queue, (now + hold, self._n, sock, data, addr))
        self.flush(now)

    def flush(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            _, _, sock, data, addr = heapq.heappop(self.queue)
            try:
                sock.sendto(data, addr)
            except OSError:
                pass


class Forwarder:
    """The event loop of one node."""

    def __init__(self, topo: Topology, node: str, run_dir: Path) -> None:
        self.topo, self.name, self.run_dir = topo, node, run_dir
        self.role = topo.role(node)
        initial = topo.build_map()
        self.control_keys = topo.control_keyring(node)
        self.sync_keys = topo.sync_keyring(node) if self.role == "instance" else None
        self.pulse: Pulse | None = None
        """Shared with the heartbeat process (`_start_heartbeats`); none at the controller."""
        self._restore_keys()
        self.incarnation = time.time_ns() // 1000
        self.ip = topo.fabric_ip(node)
        self.sel = selectors.DefaultSelector()
        self.running = True
        self.started = time.time()
        self.events_log: list[dict[str, Any]] = []
        self._addr_cache: tuple[int, dict[str, str], dict[bytes, str]] = (-1, {}, {})
        self.control = self._udp(sw.CONTROL_PORT, self._on_control)
        self.node: Any = None
        self.rep: Replicator | None = None
        self.sync: UdpSync | None = None
        self.packet: socket.socket | None = None
        self.fabric: socket.socket | None = None
        self.serving = True
        self.join_epoch: int | None = None
        self.impair = Impairment()
        self._last_expire = 0.0
        self._prepared: tuple[int, float, bool] = (-1, 0.0, True)
        """(epoch, when it was installed, failure tables still missing)."""
        self.internal_errors: Counter[str] = Counter()
        self._error_logged: dict[str, float] = {}
        self._next_tick = time.monotonic()
        self.io: dict[tuple[str, str], list[int]] = {
            (link, d): [0, 0] for link in ("fabric", "host") for d in ("rx", "tx")}
        """(link, direction) -> [packets, bytes] of the dataplane sockets,
        counted per batch (the metrics' packets and bytes)."""
        self.metrics: MetricsServer | None = None
        self.scrape_seconds = 0.0
        timers = topo.timers
        if self.role == "controller":
            self.store = keeper(topo, run_dir / f"{node}-map.json")
            """Where the controller's `Persist` events are kept (a file or etcd)."""
            shared = bool(topo.peers)
            stored = self.store.load()
            if shared and stored is None:
                stored = self._first_shared_map(initial)
            self.ctl = Controller(node, initial, self.control_keys, self.incarnation,
                                  FailureDetector(timers.heartbeat, timers.misses, timers.holddown),
                                  timers.map_refresh, time.monotonic(), stored, agents=topo.agents(),
                                  shared=shared, revision=self.store.revision)
            self.following = Following(topo.etcd_endpoints, f"/amesh/{topo.name}", self.store.revision) \
                if shared else None
            """Shared: the maps the other controllers win, from etcd's watch."""
            agents = topo.agents()
            self.agent_ips = {e.name: e.address for e in topo.extra_nodes() if e.name in agents}
            """The machines' agents: not map nodes, but they get the pushes."""
            if stored is None:   # the first map is kept before anything is pushed
                self._persist(self.ctl.map.to_json().encode())
        else:
            self.client = ControlClient(node, topo.controller, initial, self.control_keys,
                                        self.incarnation, timers.heartbeat,
                                        others={c: topo.control_keyring(node, c) for c in topo.peers})
            self.fabric = self._udp(UDP_PORT, self._on_fabric)
            self.rx, self.tx = BatchReceiver(self.fabric, size=65536), BatchSender(self.fabric)
            self.resend = ResendBuffer(timers.heartbeat * (2 * timers.misses + 2))
            self._setup_role(initial)
        port = topo.observability.metrics_port
        if port:
            self.metrics = MetricsServer(self.sel, (self.ip, port), registry_for(self),
                                         on_scrape=self._scraped)
        self.query = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = run_dir / f"{node}.sock"
        path.unlink(missing_ok=True)
        self.query.bind(str(path))
        self.query.listen(8)
        self.query.setblocking(False)
        self.sel.register(self.query, selectors.EVENT_READ, self._on_query)

    def close(self) -> None:
        """Close every socket (the process exits after `run`; tests call
        this, also twice: a test that restarts a node closes it first)."""
        if self.sel.get_map() is None:
            return
        for key in list(self.sel.get_map().values()):
            self.sel.unregister(key.fileobj)
            key.fileobj.close()
        if self.packet is not None:
            self.packet.close()
        if self.role == "controller" and self.following is not None:
            self.following.close()
        self.sel.close()
        (self.run_dir / f"{self.name}.sock").unlink(missing_ok=True)

    # -- set-up -----------------------------------------------------------------------

    def _udp(self, port: int, handler: Callable[[socket.socket, float], None]) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.bind((self.ip, port))
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, handler)
        return s

    def _setup_role(self, smap: ServiceMap) -> None:
        topo = self.topo
        if self.role == "instance":
            spec = topo.service_of(self.name)
            assert spec is not None
            self.node = ServiceNode(self.name, smap, create(spec.kind, **spec.options),
                                    capacity=topo.limits.flows, mirroring=topo.policy != "off",
                                    embryonic_per_tenant=topo.limits.embryonic_per_tenant)
            self._new_replicator()
            return
        edge = topo.ingress if self.role == "ingress" else topo.egress
        if self.role == "ingress":
            self.node = IngressNode(self.name, smap, AffinityHasher(topo.secret), capacity=topo.limits.flows)
        else:
            self.node = EgressNode(self.name, smap, capacity=topo.limits.flows)
        self.edge_ip = edge.address.ip.packed
        self.edge_mac = bytes.fromhex(topo.mac_of(self.name).replace(":", ""))
        self.host_macs = {a.ip.packed: bytes.fromhex(topo.mac_of(h.name).replace(":", ""))
                          for h in topo.hosts.values() if h.attach == self.name
                          for a in (h.address, h.address6) if a is not None}
        self.own = frozenset(a for a in (self.edge_ip, edge.address.network.broadcast_address.packed,
                                         edge.address6.ip.packed if edge.address6 else None) if a)
        """The edge's own addresses on its host link (and the broadcast): the kernel's."""
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        attach_bpf(s, BPF_IP)
        if topo.gso:
            s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind((HOSTS_BRIDGE, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
        self.packet = s
        self.sel.register(s, selectors.EVENT_READ, self._on_host)

    def _new_replicator(self) -> None:
        topo = self.topo
        if self.sync is not None:
            self.sel.unregister(self.sync.sock)
            self.sync.close()
        assert self.sync_keys is not None
        self.rep = Replicator(self.node, self.sync_keys, self.incarnation,
                              Policy(topo.policy), SyncConfig(heartbeat=SYNC_HEARTBEAT, resync_limit=topo.limits.flows),
                              FailureDetector(SYNC_HEARTBEAT, topo.timers.misses, topo.timers.holddown))
        spec = topo.service_of(self.name)
        assert spec is not None
        peers = {i: (topo.fabric_ip(i), sw.SYNC_PORT) for i in spec.members if i != self.name}
        self.sync = UdpSync(self.rep, (self.ip, sw.SYNC_PORT), peers,
                            send=lambda data, addr: self._sendto(self.sync.sock, data, addr,
                                                                 time.monotonic()))
        self.sel.register(self.sync.sock, selectors.EVENT_READ, self._on_sync)

    # -- keys ------------------------------------------------------------------------------

    @property
    def keys_file(self) -> Path:
        return self.run_dir / f"{self.name}-keys.json"

    def _restore_keys(self) -> None:
        """Keys a rotation installed before this process started (a restart):
        the run directory's file wins over the topology's keys."""
        if not self.keys_file.exists():
            return
        doc = json.loads(self.keys_file.read_text())
        for purpose, ring in (("control", self.control_keys), ("sync", self.sync_keys)):
            if ring is not None and purpose in doc:
                ring.restore(doc[purpose])
        log(self.name, f"keys restored from {self.keys_file}: {self._key_ids()}")

    def _key_ids(self) -> dict[str, Any]:
        return keyrot.node_op({"control": self.control_keys, "sync": self.sync_keys}, {"op": "show"})[0]

    def _keys(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        """A `keys` query (`amesh lab rotate-key`): act, persist the keys
        (0600) and hand the control key to the heartbeat process."""
        reply, changed = keyrot.node_op({"control": self.control_keys, "sync": self.sync_keys}, req)
        if changed:
            keyrot.write_private(self.keys_file, json.dumps(
                {p: r.state() for p, r in (("control", self.control_keys), ("sync", self.sync_keys))
                 if r is not None}))
            if self.pulse is not None:
                self.pulse.set_key(self.control_keys.current, self.control_keys.keys[self.control_keys.current])
            self._note("keys", now, op=req.get("op"), purpose=req.get("purpose"), **self._key_ids())
        return reply

    # -- addressing ------------------------------------------------------------------------

    def _addresses(self) -> tuple[dict[str, str], dict[bytes, str]]:
        """Fabric addresses by node name, and node names by packed address."""
        epoch, by_name, by_ip = self._addr_cache
        if epoch != self.map.epoch:
            by_name = {n: i.address for insts in self.map.services.values() for n, i in insts.items()
                       if i.address}
            by_name.update((c, self.topo.fabric_ip(c)) for c in self.topo.controllers)
            by_ip = {socket.inet_aton(a): n for n, a in by_name.items()}
            self._addr_cache = (self.map.epoch, by_name, by_ip)
        return by_name, by_ip

    # -- handlers ---------------------------------------------------------------------------

    def _scraped(self, seconds: float) -> None:
        self.scrape_seconds += seconds

    def _on_fabric(self, sock: socket.socket, now: float) -> None:
        _, by_ip = self._addresses()
        from_fabric = self.node.from_fabric
        drops = self.node.drops
        io = self.io[("fabric", "rx")]
        for _ in range(4):
            got = self.rx.recv()
            io[0] += len(got)
            io[1] += sum([len(d) for d, _ in got])
            if not self.serving:
                drops["declared_dead"] += len(got)
            elif got:
                batch = []
                for data, src in got:
                    hop = by_ip.get(src)
                    if hop is None:
                        drops["not_a_node"] += 1
                        continue
                    try:
                        batch.append(from_fabric(data, hop, now))
                    except Exception as exc:
                        self._internal_error("fabric", exc)
                self._emit_batch(batch, now)
            if len(got) < self.rx.batch:
                return

    def _on_host(self, sock: socket.socket, now: float) -> None:
        handler = self.node.from_client if self.role == "ingress" else self.node.from_server
        skip = VNET_HDR.size if self.topo.gso else 0
        batch = []
        io = self.io[("host", "rx")]
        for _ in range(64):
            try:
                frame, addr = sock.recvfrom(70000)
            except BlockingIOError:
                break
            if addr[2] == PACKET_OUTGOING or len(frame) < skip + 34:
                continue
            if link_local(frame[skip + 14:skip + 94], self.own):
                continue  # for the namespace's own stack (its addresses, broadcast, neighbour discovery)
            options = b""
            if skip:
                vnet = VNET_HDR.unpack_from(frame)
                if vnet[0] or vnet[1]:  # a super-frame, or a checksum left to the receiver
                    options = wire.pack_gso(*vnet)
                    self.node.counters["super_frames"] += vnet[1] != 0
            try:
                batch.append(handler(frame[skip + 14:], now, options))
            except Exception as exc:
                self._internal_error("host", exc)
            io[1] += len(frame) - skip - 14
        io[0] += len(batch)
        self._emit_batch(batch, now)

    def _on_sync(self, sock: socket.socket, now: float) -> None:
        assert self.sync is not None
        self._out(self.sync.emit(self.sync.drain(now, on_error=self._sync_error)), now)

    def _sync_error(self, exc: Exception) -> None:
        self._internal_error("sync", exc)

    def _on_control(self, sock: socket.socket, now: float) -> bool:
        """Up to 64 control datagrams; True when the socket was emptied. The
        controller stamps each heartbeat with the time it reads it: one that
        waited while a map was being published was still sent in time."""
        for _ in range(64):
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return True
            try:
                if self.role == "controller":
                    self._controller_out(self.ctl.receive(data, time.monotonic()))
                else:
                    for ev in self.client.receive(data):
                        if isinstance(ev, MapReceived):
                            self._install(ev.smap, now)
            except Exception as exc:
                self._internal_error("control", exc)
        return False

    def _on_query(self, sock: socket.socket, now: float) -> None:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                req = json.loads(conn.makefile("r").readline() or "{}")
                reply = self.answer(req, now) if isinstance(req, dict) else {"error": "expected a JSON object"}
            except (OSError, ValueError) as exc:
                reply = {"error": str(exc)}
            except Exception as exc:
                self._internal_error("query", exc)
                reply = {"error": f"internal error: {exc!r}"}
            try:
                conn.sendall((json.dumps(reply) + "\n").encode())
            except OSError:
                pass

    def _internal_error(self, where: str, exc: BaseException) -> None:
        """Count an exception of handler `where`; log it, rate-limited."""
        self.internal_errors[where] += 1
        now = time.monotonic()
        if now - self._error_logged.get(where, -ERROR_LOG_EVERY) >= ERROR_LOG_EVERY:
            self._error_logged[where] = now
            log(self.name, f"internal_error in {where} ({self.internal_errors[where]} so far; "
                           f"one traceback a second per handler):\n"
                + "".join(traceback.format_exception(exc)).rstrip())

    # -- output -------------------------------------------------------------------------------

    def _emit_batch(self, batch: list[list[Any]], now: float) -> None:
        """The node's events for packets received together, one list each."""
        for events in batch:
            for ev in events:
                if isinstance(ev, TookOver):
                    self._note("took_over", now, flow=f"0x{ev.key[1]:08x}")
        if self.rep is not None and self.sync is not None:
            self._out(self.sync.emit(self.rep.process_batch(batch, now)), now)
        else:
            self._out([ev for events in batch for ev in events], now)

    def _out(self, events: list[Any], now: float) -> None:
        by_name, _ = self._addresses()
        assert self.fabric is not None
        sends = []
        for ev in events:
            if isinstance(ev, Send):
                addr = by_name.get(ev.to)
                if addr is None:
                    self.node.drops["no_address"] += 1
                    continue
                self.resend.record(now, ev.to, ev.data)
                if self.impair.active:
                    self.impair.submit(self.fabric, ev.data, (addr, UDP_PORT), now)
                else:
                    sends.append((ev.data, (addr, UDP_PORT)))
            elif isinstance(ev, Deliver):
                self._deliver(ev.data, ev.options)
            elif isinstance(ev, Declared):
                self._note(f"peer_{ev.health.value}", now, peer=ev.peer)
        if sends:
            sent = self.tx.send(sends)
            self.node.drops["send_error"] += len(sends) - sent
            io = self.io[("fabric", "tx")]
            io[0] += sent
            io[1] += sum([len(d) for d, _ in sends])

    def _sendto(self, sock: socket.socket, data: bytes, addr: tuple[str, int], now: float) -> None:
        if self.impair.active:
            self.impair.submit(sock, data, addr, now)
            return
        try:
            sock.sendto(data, addr)
        except OSError:
            self.node.drops["send_error"] += 1

    def _deliver(self, ip: bytes, options: bytes) -> None:
        v6 = ip[0] >> 4 == 6
        mac = self.host_macs.get(ip[24:40] if v6 else ip[16:20])
        if mac is None or self.packet is None:
            self.node.drops["unknown_host"] += 1
            return
        vnet = b""
        if self.topo.gso:
            try:
                fields = wire.read_gso(options)
            except wire.HeaderError:
                self.node.drops["bad_option"] += 1
                return
            vnet = VNET_HDR.pack(*fields) if fields else bytes(VNET_HDR.size)
        try:
            self.packet.send(vnet + mac + self.edge_mac + ETHERTYPE[6 if v6 else 4] + ip)
        except OSError:
            self.node.drops["send_error"] += 1
            return
        io = self.io[("host", "tx")]
        io[0] += 1
        io[1] += len(ip)

    def _controller_out(self, events: list[Any]) -> None:
        by_name, _ = self._addresses()
        for ev in events:
            if isinstance(ev, ControlSend):
                try:
                    self.control.sendto(ev.data, (by_name.get(ev.to) or self.agent_ips[ev.to], sw.CONTROL_PORT))
                except (OSError, KeyError):
                    self.ctl.counters["send_error"] += 1
            elif isinstance(ev, Persist):
                self._persist(ev.data)
            elif isinstance(ev, Propose):
                self._propose(ev)
            elif isinstance(ev, MapPublished):
                self._note("epoch", time.monotonic(), epoch=ev.epoch, reason=ev.reason)
            elif isinstance(ev, Declared):
                self._note(f"declared_{ev.health.value}", ev.at, peer=ev.peer,
                           last_heard=round(time.time() - (time.monotonic() - ev.last_heard), 6))

    def _persist(self, data: bytes) -> None:
        """Keep a published map before it is pushed; a failure is counted
        and logged, the map in memory is pushed all the same, and `tick`
        tries again when the store says it is due (`Retrying`)."""
        try:
            self.store.keep(data, time.monotonic())
        except Conflict as exc:
            self.ctl.counters["persist_conflict"] += 1
            log(self.name, f"map store: {exc}")
        except KeepError as exc:
            self.ctl.counters["persist_error"] += 1
            log(self.name, f"map store: {exc}")

    def _first_shared_map(self, initial: ServiceMap) -> bytes:
        """The topology's map, written if etcd has none yet; a peer that
        wrote first wins, and its map is the one taken."""
        data = initial.to_json().encode()
        try:
            self.store.keep(data, time.monotonic())
            return data
        except Conflict:
            return self.store.load() or data

    def _propose(self, p: Propose) -> None:
        """A shared controller's next map, written only if etcd still holds
        the revision it was computed from; the answer goes back to the core
        (won: push it; lost: adopt the winner's; no answer: propose again).
        The loop waits for the write: milliseconds on the lab's cluster,
        KEEP_TIMEOUT per member that does not answer."""
        now = time.monotonic()
        try:
            res = self.store.inner.propose(p.data, p.computed_from)
        except KeepError as exc:
            self.ctl.counters["persist_error"] += 1
            log(self.name, f"map store: {exc}")
            res = None
        if res is None or res.stored is None:
            self._controller_out(self.ctl.on_cas(False, 0, None, now))
        else:
            self._controller_out(self.ctl.on_cas(res.won, res.stored.revision,
                                                 None if res.won else res.stored.value, now))

    def _note(self, what: str, mono: float, **fields: Any) -> None:
        wall = time.time() - (time.monotonic() - mono)
        entry = {"event": what, "time": round(wall, 6), **fields}
        self.events_log.append(entry)
        del self.events_log[:-200]
        log(self.name, " ".join(f"{k}={v}" for k, v in entry.items()))

    def _install(self, smap: ServiceMap, now: float) -> None:
        me = smap.services.get(smap.service_of(self.name) or "", {}).get(self.name)
        was = self.map.services.get(self.map.service_of(self.name) or "", {}).get(self.name)
        old = self.map
        if self.rep is not None:
            self.rep.update_map(smap, now)
        else:
            self.node.update_map(smap, now)
        done = time.monotonic()   # `now` is when the datagram was read: the map's decoding is after it
        self._note("map", done, epoch=smap.epoch, install_ms=round((done - now) * 1e3, 3))
        again = self.resend.reroute(old, smap, now) if self.serving else []
        if again:
            self._note("resent", now, packets=len(again), to=sorted({s.to for s in again}))
            self._out(again, now)
        st = standing(me, was, self.serving, self.join_epoch, smap.epoch)
        self.join_epoch = st.join_epoch
        if st.change == "declared_dead":
            self._declared_dead(now)
        elif st.change == "serving_again":
            self.serving = True
            self.client.declared_dead = False
            self._note("serving_again", now)

    def _declared_dead(self, now: float) -> None:
        """The map says we are dead (we were partitioned or hung): stop
        serving, forget every flow, and come back as a new incarnation."""
        self.serving = False
        self.client.declared_dead = True
        self.node.counters["declared_dead"] += 1
        n = len(self.node.flows)
        for e in list(self.node.flows):
            self.node.flows.delete(e.key, "discarded_declared_dead")
        self.incarnation = time.time_ns() // 1000
        if self.rep is not None:
            self._new_replicator()
        self._note("declared_dead_stop_serving", now, flows_discarded=n)

    # -- queries --------------------------------------------------------------------------------

    def answer(self, req: dict[str, Any], now: float) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return self.status(now)
        if cmd == "flows":
            return {"node": self.name, "flows": self.flows(now)}
        if cmd == "map":
            smap = self.map
            return {"map": smap.to_dict(),
                    "primaries": {s: smap.table(s).primary_counts() for s in smap.services},
                    "history": getattr(getattr(self, "ctl", None), "history", [])}
        if cmd == "operator" and self.role == "controller":
            try:
                evs = self.ctl.operator(str(req.get("node")), str(req.get("action")), now)
            except ValueError as exc:
                return {"error": str(exc)}
            self._controller_out(evs)
            return {"epoch": self.ctl.map.epoch}
        if cmd == "impair":
            self.impair = Impairment(float(req.get("loss", 0)), float(req.get("delay", 0)),
                                     float(req.get("reorder", 0)))
            self._note("impair", now, loss=self.impair.loss, delay=self.impair.delay,
                       reorder=self.impair.reorder)
            return {"impair": {"loss": self.impair.loss, "delay": self.impair.delay,
                               "reorder": self.impair.reorder}}
        if cmd == "keys":
            return self._keys(req, now)
        if cmd == "resync" and self.rep is not None:
            peer = str(req.get("peer", ""))
            if peer not in self.rep.channels:
                return {"error": f"no sync peer {peer!r}"}
            return {"bulk": self.rep.resync(peer, now)}
        return {"error": f"unknown command {cmd!r}"}

    @property
    def map(self) -> ServiceMap:
        """The controller's live map, or the one this node's core holds."""
        return self.ctl.map if self.role == "controller" else self.node.map

    def status(self, now: float) -> dict[str, Any]:
        waiting = self._not_ready()
        out: dict[str, Any] = {"node": self.name, "role": self.role, "pid": os.getpid(),
                               "ready": not waiting, "not_ready": waiting,
                               "epoch": self.map.epoch, "serving": self.serving,
                               "incarnation": self.incarnation, "uptime": round(time.time() - self.started, 3),
                               "internal_error": dict(self.internal_errors), "keys": self._key_ids(),
                               "events": self.events_log[-50:]}
        if self.role == "controller":
            out["health"] = {p: self.ctl.detector.health(p).value for p in self.ctl.members}
            out["states"] = {n: i.state.value for insts in self.map.services.values()
                             for n, i in insts.items()}
            out["counters"] = dict(self.ctl.counters)
            out["held_epochs"] = self.ctl.held
            out["rejected"] = dict(self.ctl.endpoint.rejected)
            out["store"] = self.store.describe()
            if self.following is not None:
                out["store"]["following"] = self.following.error or "watching"
            out["revision"] = self.ctl.revision
            return out
        out["counters"] = dict(self.node.counters)
        out["drops"] = dict(self.node.drops)
        out["flow_table"] = {"flows": len(self.node.flows), "replicas": self.node.flows.replicas,
                             **dict(self.node.flows.counters)}
        out["io"] = {f"{link}_{d}": v[:] for (link, d), v in self.io.items()}
        out["metrics"] = {"scrapes": self.metrics.scrapes if self.metrics else 0,
                          "scrape_seconds": round(self.scrape_seconds, 6)}
        out["resend"] = {"resent": self.resend.resent, "unroutable": self.resend.unroutable,
                         "bad": self.resend.bad}
        if self.rep is not None:
            out["sync"] = self.rep.snapshot(now)
        out["control_rejected"] = dict(self.client.endpoint.rejected)
        return out

    def _not_ready(self) -> list[str]:
        if self.role == "controller":
            return []
        svc = self.map.service_of(self.name)
        me = self.map.services[svc].get(self.name) if svc else None
        in_sync = self.rep is None or self.rep.synced_since(1)  # a bulk from every live peer
        return not_ready(self.client.confirmed, me.state if me else None, self.serving, in_sync)

    def flows(self, now: float) -> list[dict[str, Any]]:
        out = []
        for e in self.node.flows:
            chain, code, proto, lo, lport, hi, hport = e.key
            out.append({"chain": chain, "code": f"0x{code:08x}", "proto": proto,
                        "lo": f"{socket.inet_ntop(socket.AF_INET if len(lo) == 4 else socket.AF_INET6, lo)}:{lport}",
                        "hi": f"{socket.inet_ntop(socket.AF_INET if len(hi) == 4 else socket.AF_INET6, hi)}:{hport}",
                        "role": "replica" if e.replica else "primary", "version": e.version,
                        "packets": e.packets, "rev_packets": e.rev_packets, "bytes": e.bytes,
                        "age_s": round(now - e.created, 3), "idle_s": round(now - e.last_seen, 3),
                        "fwd_hop": e.fwd_hop, "prev_hop": e.prev_hop,
                        "state": plain(e.state)})
        return out

    # -- loop ---------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self._prepare_failures(now)
        if self.metrics is not None and self.metrics.clients:
            self.metrics.expire(now)
        if self.role == "controller":
            # the detector judges silence only once what waited is read: a
            # loop busy publishing maps for 30 ms had declared every member
            # dead, whose heartbeats sat in the socket, and each false death
            # published another map (a cascade the hang test saw)
            for _ in range(16):
                if self._on_control(self.control, now):
                    break
            if self.following is not None:
                for got in self.following.drain():
                    self._controller_out(self.ctl.adopt(got.value, got.revision, time.monotonic()))
            self._controller_out(self.ctl.tick(time.monotonic()))
            if (again := self.store.due(now)) is not None:
                self._persist(again)
            return
        if self.impair.active or self.impair.pending:
            self.impair.flush(now)
        self.resend.expire(now)
        if self.rep is not None and self.sync is not None:
            self.client.in_sync = self.join_epoch is not None and self.rep.synced_since(self.join_epoch)
            self._out(self.sync.emit(self.rep.tick(now)), now)
            if now - self._last_expire >= EXPIRE_EVERY:
                self._last_expire = now
                self._emit_batch([self.node.expire(now)], now)

    def _prepare_failures(self, now: float) -> None:
        """Build the bucket tables of the next single failure, one per tick,
        once the map has been quiet for PREPARE_AFTER (not during a failover)."""
        m = self.map
        epoch, since, missing = self._prepared
        if m.epoch != epoch:
            self._prepared = (m.epoch, now, True)
        elif missing and now - since >= PREPARE_AFTER:
            self._prepared = (epoch, since, m.prepare_failures(budget=1) > 0)

    def _start_heartbeats(self) -> None:
        """Heartbeats come from a child process at real-time priority.

        A thread would share the GIL with the packet loop: when the loop's
        thread holds it and the scheduler runs another process, the
        heartbeat waits, and on a loaded 2-core machine that wait reached
        the detection time (live instances declared dead). The child has
        its own interpreter. It stops, so the controller declares this node
        dead, when the forwarder dies (it is killed with it:
        PR_SET_PDEATHSIG) or when the loop has not come round for
        `HANG_AFTER` (a hung or SIGSTOPped forwarder). The loop shares its
        last round's time, the epoch it holds and its status flags through
        a small shared mapping (`Pulse`)."""
        self.pulse = Pulse()
        self.pulse.set_key(self.control_keys.current, self.control_keys.keys[self.control_keys.current])
        self._pulse()
        parent = os.getpid()
        if os.fork() != 0:
            return
        try:
            keep = self.control.fileno()  # every other socket stays the loop's alone (rebinds)
            os.closerange(3, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            realtime()
            ctls = self.topo.controllers
            addr = {c: (self.topo.fabric_ip(c), sw.CONTROL_PORT) for c in ctls}
            client = self.client
            while os.getppid() == parent:
                now = time.monotonic()
                last, client.epoch, client.in_sync, client.declared_dead, incs = self.pulse.read()
                for c, inc in zip(ctls, incs):
                    if inc:
                        client.endpoints[c].incarnations[c] = inc
                kid, key = self.pulse.key()
                if client.endpoint.keyring.keys.get(kid) != key or client.endpoint.keyring.current != kid:
                    client.endpoint.keyring = sw.Keyring({kid: key}, kid)   # rotated: sign with it
                if now - last <= HANG_AFTER:
                    for send in client.tick(now):
                        try:
                            self.control.sendto(send.data, addr[send.to])
                        except OSError:
                            pass
                time.sleep(client.interval / 2)
        finally:
            os._exit(0)

    def _pulse(self) -> None:
        client = self.client
        self.pulse.write(time.monotonic(), client.epoch, client.in_sync, client.declared_dead,
                         [client.endpoints[c].incarnations.get(c, 0) for c in self.topo.controllers])

    def run(self) -> None:
        log(self.name, f"{self.role} up on {self.ip} pid {os.getpid()} epoch {self.map.epoch}")
        if self.role == "controller":
            realtime()
        else:
            self._start_heartbeats()
        self._next_tick = time.monotonic()
        while self.running:
            if self.role != "controller":
                self._pulse()
            self.poll(max(0.0, self._next_tick - time.monotonic()))
        log(self.name, "stopping")

    def poll(self, timeout: float) -> None:
        """One round of the loop: the handlers of the sockets ready within
        `timeout`, then the tick when due. An exception of any of them is
        counted and logged (`_internal_error`), never raised."""
        for key, _mask in self.sel.select(timeout):
            try:
                key.data(key.fileobj, time.monotonic())
            except Exception as exc:
                self._internal_error(key.data.__name__.removeprefix("_on_"), exc)
        now = time.monotonic()
        if now >= self._next_tick:
            try:
                self.tick(now)
            except Exception as exc:
                self._internal_error("tick", exc)
            self._next_tick = now + TICK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="affinity-mesh lab node")
    ap.add_argument("--topology", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--run-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        fwd = Forwarder(load(args.topology), args.node, args.run_dir)
    except KeepError as exc:
        log(args.node, f"map store: {exc}")
        return 1

    def stop(_sig: int, _frame: object) -> None:
        fwd.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fwd.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
