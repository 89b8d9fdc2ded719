"""The state-sync protocol between two instances, without I/O.

Theory of operation
-------------------
One `SyncChannel` joins two instances (each may be primary for some buckets
and secondary for others, so a channel carries updates both ways). It is fed
datagrams (`receive`) and clock ticks (`tick`), and is handed flow updates to
mirror (`submit`) and bulk transfers to run (`start_bulk`). Every call returns
events: `Transmit` datagrams for the shell to send, `Apply` updates for the
node's flow table, and notices (peer restarted, acked, bulk progress, in sync,
rejections).

*Handshake.* Each side announces its incarnation (start time in
microseconds) and the first sequence number it will use in HELLO, repeated
every heartbeat interval until the peer's HELLO shows it knows ours. The
states and transitions are the table `TRANSITIONS`. A *larger* incarnation
from a known peer means it restarted: it lost its replicas, so our unacked
records for its old self are dropped (counted) and `PeerRestarted` tells the
node to bulk-sync it; a *smaller* one is refused (`stale_incarnation`).

*Bound to both lives.* Every datagram names the receiver's incarnation as
the sender knows it, and a datagram bound to another incarnation of ours is
refused (`wrong_incarnation`): after a restart, nothing recorded from the
peer before it (an ACK of records our new self never sent, a NACK, a
RESYNC) can be replayed to us, although our replay window is new. The one
exception is a datagram holding only a HELLO, which is how a peer that does
not know us yet speaks first. A replayed HELLO can therefore arrive, and it
can name an old sequence number; so a HELLO from a known peer whose next
sequence number lies *beyond* what we expect moves our expectation up to it
(`hello_resync`): a peer's HELLO names the first record it still holds for
us, everything before it was acknowledged by us or dropped for our former
self, so waiting for it would wedge the stream (the same happens without an
attacker when a HELLO sent before the peer learnt of our restart arrives
first). A HELLO naming a sequence number below our expectation changes
nothing.

*Reliability* (in the spirit of conntrackd's FTFW, without its silent loss).
Submitted updates wait in a pending set keyed by flow, so a newer update of
a flow replaces an unsent older one (counted `coalesced`). The sender
flushes them in batches (at `batch_records` or after `batch_delay`),
numbering reliable records (flow upserts/deletes, bulk begin/end) with
consecutive 64-bit sequence numbers, and keeps every sent record in a
bounded resend queue until cumulatively ACKed; it resends on NACK ranges and
after `rto` without progress. The resend queue is also the send window: when
it is full nothing more is sent, so it never overflows and no sent record is
ever abandoned. What overflows instead is the pending set: beyond
`pending_limit` flows, an update is not kept but its flow is remembered
(counted `resend_overflow`) and handed back in `ResyncFlows` as soon as the
window has room, for the node to re-submit the flow's current state (versions
make that safe). Nothing is lost silently. The receiver applies records
strictly in order (a bounded reorder buffer absorbs reordering; duplicates
are counted and ignored), ACKs cumulatively every `ack_every` records or
`ack_delay`, and NACKs the gaps it sees.

*Authentication.* Every datagram carries HMAC-SHA-256-128 under a key id
(the keyring accepts two keys while rotating) and a 64-bit per-datagram
counter checked against a sliding anti-replay window; refusals are counted
by reason (`syncwire.SyncError`).

*Bulk sync.* `start_bulk` streams a set of flows between BULK_BEGIN and
BULK_END through the same reliable stream, paced (`bulk_rate` flows/s) and
flow-controlled (never more than half the resend queue in flight), with
progress events. The receiver reports `InSync` at BULK_END. An operator can
force one at any time (`request_resync` asks the peer for one).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from itertools import islice

from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate
from dataplane.core.flowtable import FlowKey
from dataplane.core.syncwire import Record, RecordType, SyncError


@dataclass(frozen=True)
class SyncConfig:
    """Timers and bounds of a channel (seconds, records)."""

    heartbeat: float = 0.010
    batch_records: int = 64
    batch_delay: float = 0.001
    rto: float = 0.030
    ack_every: int = 32
    ack_delay: float = 0.002
    nack_interval: float = 0.005
    resend_queue: int = 8192
    pending_limit: int = 1 << 17
    resync_limit: int = 1 << 20
    """Most flow keys remembered for re-sending past `pending_limit` (a
    silent peer made this grow without bound: 860k keys after 1M flows).
    Past it the keys are forgotten and the peer gets one full bulk when it
    answers (`needs_bulk`, counted as `resync_overflow_bulk`). The forwarder
    sets it to the flow table's capacity."""
    reorder_buffer: int = 16384
    bulk_rate: float = 200_000.0
    retransmit_burst: int = 256
    """Records resent on one RTO; four times this, the most resent at once."""
    retransmit_rate: float = 50_000.0
    """Token bucket of every retransmission (records/s): NACKs, however
    many, never make a channel send more than this again."""
    retransmit_holdoff: float = 0.004
    """A record resent less than this ago is not resent on a NACK (the gap
    is in flight): a burst of NACKs of one range is answered once. Below
    the receiver's `nack_interval`, so its own repeated NACK is answered."""


# -- events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transmit:
    data: bytes


@dataclass(slots=True)
class Apply:
    """Apply a mirrored flow update (one per record: not frozen, which
    costs three times as much to build; treat it as immutable)."""

    update: FlowUpdate


@dataclass(frozen=True, slots=True)
class Acked:
    upto: int
    """Every reliable record with seq < upto was received by the peer."""


@dataclass(frozen=True, slots=True)
class PeerRestarted:
    first_contact: bool


@dataclass(frozen=True, slots=True)
class ResyncFlows:
    keys: frozenset[FlowKey]


@dataclass(frozen=True, slots=True)
class ResyncRequested:
    pass


@dataclass(frozen=True, slots=True)
class BulkProgress:
    bulk_id: int
    sent: int
    total: int


@dataclass(frozen=True, slots=True)
class BulkDone:
    bulk_id: int
    total: int


@dataclass(frozen=True, slots=True)
class InSync:
    bulk_id: int
    flows: int
    epoch: int
    """The sender's map epoch when it started the bulk."""


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


SyncEvent = (Transmit | Apply | Acked | PeerRestarted | ResyncFlows | ResyncRequested
             | BulkProgress | BulkDone | InSync | Rejected)


# -- handshake states as data (h11 style) -------------------------------------------


class State(Enum):
    HELLO_SENT = "hello_sent"
    """We announced ourselves and know nothing of the peer."""
    KNOWN = "known"
    """We know the peer's incarnation; it has not shown it knows ours."""
    ESTABLISHED = "established"
    """Both sides know each other: reliable records flow."""


TRANSITIONS: dict[tuple[State, str], State] = {
    (State.HELLO_SENT, "hello"): State.KNOWN,
    (State.HELLO_SENT, "hello_ack"): State.ESTABLISHED,
    (State.KNOWN, "hello"): State.KNOWN,
    (State.KNOWN, "hello_ack"): State.ESTABLISHED,
    (State.ESTABLISHED, "hello"): State.KNOWN,
    (State.ESTABLISHED, "hello_ack"): State.ESTABLISHED,
}
"""'hello': a HELLO not bound to our incarnation (the peer does not know us
yet); 'hello_ack': one bound to it."""


class _Bulk:
    def __init__(self, bulk_id: int, updates: list[FlowUpdate], epoch: int) -> None:
        self.id = bulk_id
        self.epoch = epoch
        self.total = len(updates)
        self.items: Iterator[FlowUpdate] = iter(updates)
        self.sent = 0
        self.fed = False
        """BULK_END is queued: every flow of the bulk was submitted."""
        self.end_seq: int | None = None
        """seq of the BULK_END record once sent; the bulk is done when acked."""
        self.credit = 0.0


class SyncChannel:
    """One side of the sync channel between `me` and `peer`."""

    def __init__(self, me: str, peer: str, keyring: sw.Keyring, incarnation: int,
                 config: SyncConfig | None = None) -> None:
        self.me, self.peer = me, peer
        self.my_id, self.peer_id = sw.node_id(me), sw.node_id(peer)
        self.keyring = keyring
        self.incarnation = incarnation
        self.config = config or SyncConfig()
        self.state = State.HELLO_SENT
        self.stats: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self._counter = 0
        # sending side
        self.next_seq = 1
        self._pending: OrderedDict[object, tuple[Record | FlowUpdate, FlowKey | None, int]] = OrderedDict()
        """flow key -> (update not yet sent, key, version), or a control
        token -> (record, None, 0). An update is encoded only when it is
        flushed, so one replaced by a newer update of its flow cost nothing."""
        self._pending_since: float | None = None
        self._tokens = 0
        self._end_tokens: dict[object, _Bulk] = {}
        self._key_seq: dict[FlowKey, int] = {}
        """flow key -> seq of its latest sent, unacked record"""
        self._unacked: OrderedDict[int, tuple[Record, FlowKey | None, float, float | None]] = OrderedDict()
        """seq -> (record, flow key, first sent, last resent or None)"""
        self._resync_keys: set[FlowKey] = set()
        self.needs_bulk = False
        """Too many flows to remember for the peer: it gets a full bulk
        (`ResyncRequested`) once the channel is established."""
        self.acked_upto = 1
        self._bulks: list[_Bulk] = []
        self._bulk_ids = 0
        self._rtx_tokens = float(self.config.retransmit_burst * 4)
        self._rtx_at = 0.0
        self._last_hello = -1.0
        self._last_heartbeat = -1.0
        self._last_tick: float | None = None
        # receiving side
        self.peer_incarnation = 0
        self.expected = 1
        self._buffer: dict[int, Record | None] = {}
        self._window = sw.ReplayWindow()
        self._unacked_in = 0
        self._last_ack_sent = 0.0
        self._last_nack = -1.0
        self.peer_in_sync = False
        """Receiver's view: a full bulk from the peer completed since it (re)started."""
        self.synced_epoch = 0
        """Highest sender map epoch of a bulk from the peer completed here."""
        self.last_heard = -1.0

    # -- public API ------------------------------------------------------------------

    def submit(self, update: FlowUpdate, now: float) -> None:
        """Queue a flow update for the peer, replacing an unsent older one.

        An update older than the one already waiting for its flow is dropped
        (`stale_submit`): a bulk built from a snapshot can trail the live
        updates of the same flow, and must not overwrite them."""
        k = update.key
        waiting = self._pending.get(k)
        if waiting is not None:
            if waiting[2] >= update.version:
                self.stats["stale_submit"] += 1
                return
            self.stats["coalesced"] += 1
        elif len(self._pending) >= self.config.pending_limit:
            self.stats["resend_overflow"] += 1
            if self.needs_bulk or k in self._resync_keys:
                return
            if len(self._resync_keys) >= self.config.resync_limit:
                self.needs_bulk = True
                self._resync_keys.clear()
                self.stats["resync_overflow_bulk"] += 1
                return
            self._resync_keys.add(k)
            return
        self._pending[k] = (update, k, update.version)
        if self._pending_since is None:
            self._pending_since = now

    def settled(self, key: FlowKey) -> bool:
        """True when the peer acknowledged every update of `key` submitted so
        far (the `acked` policy releases a held packet on this)."""
        return key not in self._pending and key not in self._key_seq and key not in self._resync_keys

    def bulk_running(self, bulk_id: int) -> bool:
        """True until the bulk `bulk_id` is acknowledged whole (or dropped
        because the peer restarted)."""
        return any(b.id == bulk_id for b in self._bulks)

    def start_bulk(self, updates: Iterable[FlowUpdate], now: float, epoch: int = 0) -> int:
        """Stream `updates` as one bulk transfer, stamped with the sender's
        map `epoch` (the receiver knows it is in sync as of that epoch)."""
        self._bulk_ids += 1
        items = list(updates)
        b = _Bulk(self._bulk_ids, items, epoch)
        self._bulks.append(b)
        self._control_record(sw.bulk(RecordType.BULK_BEGIN, b.id, b.total, epoch), now)
        self.stats["bulk_started"] += 1
        return b.id

    def request_resync(self) -> list[SyncEvent]:
        """Ask the peer for a full bulk transfer (operator-forced resync)."""
        return [self._transmit(0, [Record(RecordType.RESYNC, b"")])]

    def flush(self, now: float) -> list[SyncEvent]:
        """Send everything pending now (the `ordered` policy calls this)."""
        return self._flush(now, force=True)

    def flush_due(self, now: float) -> list[SyncEvent]:
        """Send pending updates if a batch is full or old enough (`async`).
        The `async` policy asks after every mirrored packet, and the answer
        is mostly no: that answer is given here, before `_flush`'s checks."""
        if (len(self._pending) < self.config.batch_records
                and now - (self._pending_since or now) < self.config.batch_delay):
            return []
        return self._flush(now)

    def in_sync(self, now: float) -> bool:
        """Sender's view: the peer holds everything we mirrored (no bulk,
        resync or overflow outstanding, nothing unacked for more than 2 RTOs)."""
        if self.state != State.ESTABLISHED or self._bulks or self._resync_keys or self.needs_bulk:
            return False
        return self.lag(now) < 2 * self.config.rto

    def lag(self, now: float) -> float:
        """Age of the oldest unacknowledged record (replication lag)."""
        return self._oldest_age(now)

    def snapshot(self, now: float) -> dict[str, object]:
        """Per-peer observability: the `sync` part of the forwarder's status
        query, which `amesh top` and the Prometheus metrics read."""
        return {"peer": self.peer, "state": self.state.value, "in_sync": self.in_sync(now),
                "peer_in_sync": self.peer_in_sync, "synced_epoch": self.synced_epoch,
                "next_seq": self.next_seq,
                "acked_upto": self.acked_upto, "resend_queue": len(self._unacked),
                "pending": len(self._pending), "lag_ms": round(self.lag(now) * 1000, 3),
                "unsynced_flows": len(self._resync_keys) + len(self._unacked),
                "needs_bulk": self.needs_bulk,
                "bulks": [{"id": b.id, "sent": b.sent, "total": b.total} for b in self._bulks],
                "stats": dict(self.stats), "rejected": dict(self.rejected)}

    # -- sending -----------------------------------------------------------------------

    def _control_record(self, rec: Record, now: float) -> tuple[str, int]:
        self._tokens += 1
        token = ("control", self._tokens)
        self._pending[token] = (rec, None, 0)
        if self._pending_since is None:
            self._pending_since = now
        return token

    def _transmit(self, seq: int, records: list[Record]) -> Transmit:
        self._counter += 1
        data = sw.encode(self.keyring, self.my_id, self.peer_id, self.incarnation,
                         self.peer_incarnation, self._counter, seq, records)
        self.stats["datagrams_sent"] += 1
        self.stats["bytes_sent"] += len(data)
        return Transmit(data)

    def _flush(self, now: float, force: bool = False) -> list[SyncEvent]:
        if not self._pending or self.state != State.ESTABLISHED:
            return []
        due = (force or len(self._pending) >= self.config.batch_records
               or now - (self._pending_since or now) >= self.config.batch_delay)
        if not due:
            return []
        room = self.config.resend_queue - len(self._unacked)
        if room <= 0:
            self.stats["window_full"] += 1
            return []
        items = []
        pop, unacked, key_seq, end_tokens = self._pending.popitem, self._unacked, self._key_seq, self._end_tokens
        flow_record = sw.flow_record
        seq = self.next_seq
        for _ in range(min(room, len(self._pending))):
            token, (item, key, _version) = pop(last=False)
            if key is not None:
                rec = flow_record(item)  # type: ignore[arg-type]  # a flow's entry holds its update
                key_seq[key] = seq
            else:
                rec = item  # type: ignore[assignment]  # a control token's entry holds its record
                bulk = end_tokens.pop(token, None)
                if bulk is not None:
                    bulk.end_seq = seq
            unacked[seq] = (rec, key, now, None)
            items.append((seq, rec))
            seq += 1
        self.next_seq = seq
        self._pending_since = now if self._pending else None
        self.stats["records_sent"] += len(items)
        return self._send_runs(items)

    def _send_runs(self, items: list[tuple[int, Record]]) -> list[SyncEvent]:
        """Datagrams of consecutive records under the size limit."""
        out: list[SyncEvent] = []
        run: list[Record] = []
        first = prev = 0
        size = 0
        for seq, rec in items:
            rsize = 3 + len(rec.value)
            if run and (seq != prev + 1 or size + rsize > sw.MAX_DATAGRAM - sw.HEADER_LEN - sw.TAG_LEN):
                out.append(self._transmit(first, run))
                run, size = [], 0
            if not run:
                first = seq
            run.append(rec)
            size += rsize
            prev = seq
        if run:
            out.append(self._transmit(first, run))
        return out

    def _retransmit(self, seqs: Iterable[int], now: float, holdoff: float = 0.0) -> list[SyncEvent]:
        """Send these unacked records again, as the token bucket allows;
        skip those already resent less than `holdoff` ago."""
        cap = self.config.retransmit_burst * 4
        tokens = min(cap, self._rtx_tokens + (now - self._rtx_at) * self.config.retransmit_rate)
        self._rtx_at = now
        items = []
        for s in seqs:
            entry = self._unacked.get(s)
            if entry is None:
                continue
            rec, key, first, last = entry
            if last is not None and now - last < holdoff:
                self.stats["retransmit_held_off"] += 1
                continue
            if tokens < 1:
                self.stats["retransmit_limited"] += 1
                break
            tokens -= 1
            self._unacked[s] = (rec, key, first, now)
            items.append((s, rec))
        self._rtx_tokens = tokens
        self.stats["retransmitted"] += len(items)
        return self._send_runs(items)

    def _on_nack(self, spans: list[tuple[int, int]], now: float) -> list[SyncEvent]:
        """Resend what a NACK names, clamped to what is outstanding, each
        record once however often the ranges repeat or overlap."""
        self.stats["nacks_received"] += 1
        lo, hi = self.acked_upto, self.next_seq - 1
        clamped = sorted((max(a, lo), min(b, hi)) for a, b in spans if a <= hi and b >= lo and a <= b)
        seqs: list[int] = []
        limit = self.config.retransmit_burst * 4
        top = lo - 1
        for a, b in clamped:
            for s in range(max(a, top + 1), b + 1):
                if len(seqs) >= limit:
                    break
                seqs.append(s)
            top = max(top, b)
        return self._retransmit(seqs, now, self.config.retransmit_holdoff)

    def _on_ack(self, upto: int, now: float) -> list[SyncEvent]:
        if upto <= self.acked_upto:
            return []
        upto = min(upto, self.next_seq)
        while self._unacked and next(iter(self._unacked)) < upto:
            seq, (_rec, key, _first, _last) = self._unacked.popitem(last=False)
            if key is not None and self._key_seq.get(key) == seq:
                del self._key_seq[key]
        self.stats["acked"] += upto - self.acked_upto
        self.acked_upto = upto
        out: list[SyncEvent] = [Acked(upto)]
        for b in list(self._bulks):
            if b.end_seq is not None and b.end_seq < upto:
                self._bulks.remove(b)
                self.stats["bulk_done"] += 1
                out.append(BulkDone(b.id, b.total))
        return out

    def _feed_bulks(self, now: float, dt: float) -> list[SyncEvent]:
        out: list[SyncEvent] = []
        for b in self._bulks:
            if b.fed:
                continue
            b.credit = min(b.credit + dt * self.config.bulk_rate, self.config.batch_records * 16)
            room = self.config.resend_queue // 2 - len(self._unacked) - len(self._pending)
            n = int(min(b.credit, room))
            if n <= 0:
                continue
            sent = 0
            for u in islice(b.items, n):
                self.submit(u, now)
                sent += 1
            b.sent += sent
            b.credit -= sent
            if sent < n or b.sent == b.total:
                b.fed = True
                token = self._control_record(sw.bulk(RecordType.BULK_END, b.id, b.total, b.epoch), now)
                self._end_tokens[token] = b
            out.append(BulkProgress(b.id, b.sent, b.total))
        return out

    def _oldest_age(self, now: float) -> float:
        if not self._unacked:
            return 0.0
        _rec, _key, first, _last = next(iter(self._unacked.values()))
        return max(0.0, now - first)

    # -- time --------------------------------------------------------------------------

    def tick(self, now: float) -> list[SyncEvent]:
        """Timers: hello, heartbeat, batching, bulk pacing, acks, retransmission."""
        out: list[SyncEvent] = []
        cfg = self.config
        if self.state != State.ESTABLISHED and now - self._last_hello >= cfg.heartbeat:
            out.append(self._hello(now))
        if self.needs_bulk and self.state == State.ESTABLISHED:
            self.needs_bulk = False
            out.append(ResyncRequested())
        room = self.config.pending_limit - len(self._pending)
        if self._resync_keys and self.state == State.ESTABLISHED and room > 0:
            keys = frozenset(islice(self._resync_keys, room))
            self._resync_keys -= keys
            self.stats["resync_flows"] += len(keys)
            out.append(ResyncFlows(keys))
        dt = now - self._last_tick if self._last_tick is not None else cfg.heartbeat
        self._last_tick = now
        if self.state == State.ESTABLISHED:
            out.extend(self._feed_bulks(now, max(dt, 0.0)))
        out.extend(self._flush(now))
        records: list[Record] = []
        if self._unacked_in and now - self._last_ack_sent >= cfg.ack_delay:
            records.append(self._ack(now))
        if self._buffer and now - self._last_nack >= cfg.nack_interval:
            nack = self._nack(now)
            if nack is not None:
                records.append(nack)
        if now - self._last_heartbeat >= cfg.heartbeat and self.peer_incarnation:
            self._last_heartbeat = now
            records.append(Record(RecordType.HEARTBEAT, sw.u64(int(now * 1e6))))
            if self.peer_incarnation and not any(r.type == RecordType.ACK for r in records):
                records.append(self._ack(now))
        if records:
            out.append(self._transmit(0, records))
        if self._unacked and self.state == State.ESTABLISHED:
            seq0 = next(iter(self._unacked))
            _rec, _key, first, last = self._unacked[seq0]
            if now - (first if last is None else last) >= cfg.rto:
                self.stats["timeouts"] += 1
                out.extend(self._retransmit(list(islice(self._unacked, cfg.retransmit_burst)), now))
        return out

    def _hello(self, now: float) -> Transmit:
        self._last_hello = now
        base = next(iter(self._unacked)) if self._unacked else self.next_seq
        return self._transmit(0, [sw.hello(base, answer_me=self.state != State.ESTABLISHED)])

    def _ack(self, now: float) -> Record:
        self._unacked_in = 0
        self._last_ack_sent = now
        self.stats["acks_sent"] += 1
        return Record(RecordType.ACK, sw.u64(self.expected))

    def _nack(self, now: float) -> Record | None:
        top = max(self._buffer)
        missing = [s for s in range(self.expected, top) if s not in self._buffer]
        if not missing:
            return None
        self._last_nack = now
        self.stats["nacks_sent"] += 1
        return sw.ranges(RecordType.NACK, _spans(missing)[:64])

    # -- receiving -----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[SyncEvent]:
        """A datagram from the peer (already routed here by sender id)."""
        try:
            dg = sw.decode(self.keyring, data, self.my_id)
        except SyncError as exc:
            return self._reject(exc.reason)
        return self.accept(dg, now)

    def accept(self, dg: sw.Datagram, now: float) -> list[SyncEvent]:
        """A datagram whose tag `syncwire.decode` checked: the rest of `receive`."""
        if dg.sender != self.peer_id:
            return self._reject("wrong_sender")
        if dg.incarnation < self.peer_incarnation:
            return self._reject("stale_incarnation")
        out: list[SyncEvent] = []
        bound = dg.receiver_incarnation == self.incarnation
        new_peer = dg.incarnation > self.peer_incarnation
        if not bound or new_peer:
            hello_rec = next((r for r in dg.records if r.type == RecordType.HELLO), None)
            if not bound and (hello_rec is None or len(dg.records) != 1):
                return self._reject("wrong_incarnation")
            if new_peer:
                if hello_rec is None:
                    self.stats["unknown_incarnation"] += 1
                    return [self._hello(now)]
                try:
                    out.extend(self._new_peer(dg.incarnation, sw.read_hello(hello_rec.value)[0]))
                except SyncError as exc:
                    return self._reject(exc.reason)
        if not self._window.check_and_set(dg.counter):
            return self._reject("replay")
        self.last_heard = now
        self.stats["datagrams_received"] += 1
        try:
            seq = dg.seq
            for rec in dg.records:
                if rec.type in sw.RELIABLE:
                    out.extend(self._reliable(seq, rec, now))
                    seq += 1
                else:
                    out.extend(self._control(rec, now, new_peer, bound))
        except SyncError as exc:
            out.extend(self._reject(exc.reason))
        if self._unacked_in >= self.config.ack_every:
            out.append(self._transmit(0, [self._ack(now)]))
        return out

    def _reject(self, reason: str) -> list[SyncEvent]:
        self.rejected[reason] += 1
        return [Rejected(reason)]

    def _new_peer(self, incarnation: int, base: int) -> list[SyncEvent]:
        first = self.peer_incarnation == 0
        self.peer_incarnation = incarnation
        self.expected = base
        self._buffer.clear()
        self._window = sw.ReplayWindow()
        self.peer_in_sync = False
        self.synced_epoch = 0
        self.stats["peer_restarts" if not first else "peer_contacts"] += 1
        self.needs_bulk = False  # the peer gets a full bulk for this (PeerRestarted)
        if not first:
            dropped = len(self._unacked) + len(self._pending)
            self.stats["dropped_on_peer_restart"] += dropped
            self._unacked.clear()
            self._pending.clear()
            self._pending_since = None
            self._key_seq.clear()
            self._resync_keys.clear()
            self._bulks.clear()
            self._end_tokens.clear()
            self.acked_upto = self.next_seq
        return [PeerRestarted(first)]

    def _control(self, rec: Record, now: float, new_peer: bool, bound: bool) -> list[SyncEvent]:
        t = rec.type
        if t == RecordType.HELLO:
            base, answer_me = sw.read_hello(rec.value)
            out: list[SyncEvent] = []
            if not new_peer and base > self.expected:
                out.extend(self._resync_to(base, now))
            kind = "hello_ack" if bound else "hello"
            self.state = TRANSITIONS[(self.state, kind)]
            # answer a peer that does not know us yet, that we just met, or
            # that is not established (it needs to see that we know it)
            if kind == "hello" or new_peer or answer_me:
                out.append(self._hello(now))
            return out + self._flush(now, force=True)
        if t == RecordType.ACK:
            return self._on_ack(sw.read_u64(rec.value), now)
        if t == RecordType.NACK:
            return self._on_nack(sw.read_ranges(rec.value), now)
        if t == RecordType.RESYNC:
            self.stats["resync_requests"] += 1
            return [ResyncRequested()]
        return []  # HEARTBEAT: being heard is all it says

    def _resync_to(self, base: int, now: float) -> list[SyncEvent]:
        """The peer holds nothing for us below `base`: expect it from there."""
        self.stats["hello_resync"] += 1
        self._buffer = {s: r for s, r in self._buffer.items() if s >= base}
        self.expected = base
        return self._drain(now)

    def _reliable(self, seq: int, rec: Record, now: float) -> list[SyncEvent]:
        if seq == self.expected and not self._buffer:  # in order, nothing waiting: the common record
            self.expected = seq + 1
            self._unacked_in += 1
            return self._deliver(rec)
        if seq < self.expected or seq in self._buffer:
            self.stats["duplicates"] += 1
            return []
        if seq >= self.expected + self.config.reorder_buffer:
            self.stats["beyond_buffer"] += 1
            return []
        self._buffer[seq] = rec
        if seq != self.expected:
            self.stats["reordered"] += 1
        return self._drain(now)

    def _drain(self, now: float) -> list[SyncEvent]:
        out: list[SyncEvent] = []
        while self.expected in self._buffer:
            rec = self._buffer.pop(self.expected)
            self.expected += 1
            self._unacked_in += 1
            if rec is not None:
                out.extend(self._deliver(rec))
        return out

    def _deliver(self, rec: Record) -> list[SyncEvent]:
        """A reliable record's turn has come: what it asks of the node."""
        self.stats["records_received"] += 1
        if rec.type in _FLOW_RECORDS:
            return [Apply(sw.read_flow(rec))]
        if rec.type == RecordType.BULK_BEGIN:
            self.stats["bulk_begin_received"] += 1
        elif rec.type == RecordType.BULK_END:
            bulk_id, flows, epoch = sw.read_bulk(rec.value)
            self.peer_in_sync = True
            self.synced_epoch = max(self.synced_epoch, epoch)
            return [InSync(bulk_id, flows, epoch)]
        return []


_FLOW_RECORDS = frozenset({RecordType.FLOW_UPSERT, RecordType.FLOW_DELETE})


def _spans(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted sequence numbers as inclusive (first, last) ranges."""
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
