"""An inspection service in the patent's image: allow / block / inspect per flow.

Each flow starts in INSPECT with application id "inspecting". The first
payload decides the application (http, tls, ssh, or unknown after a few
packets without a clue). Content rules (byte patterns) are searched in each
direction's byte stream *as the receiving host will reassemble it*, not in
arrival order (issue #14: reversed, reordered, bad-checksum and overlapping
segments each walked a pattern past an arrival-order scan):

* TCP is reassembled per direction by sequence number. The next expected
  sequence number comes from the SYN (or, for a flow picked up mid-stream,
  from its first segment); the in-order bytes are scanned with a carry-over
  of ``len(longest pattern) - 1`` bytes, so a pattern split over segments
  still matches.
* A segment *ahead* of the next expected byte is dropped (``out_of_order``),
  not held: the sender's TCP retransmits it once the gap is filled, so a
  real connection recovers, and the service keeps no packets (holding would
  need a new verdict, a bounded per-flow queue, and releases the node would
  have to send later, none of which the mirror could carry). The price is a
  retransmission when the network really reorders, during inspection only.
* Bytes before the next expected one are a retransmission. The bytes the
  receiver has not acknowledged yet are kept (``Stream.history``); a
  retransmission whose bytes differ from those scanned is dropped
  (``overlap_mismatch``): the middlebox forwarded the first copy, so "first
  copy wins" cannot be enforced, but a conflicting second copy can be
  stopped. Bytes the receiver acknowledged are not compared: an honest
  receiver discards them, and an attacking receiver (the client of a
  server's stream) only gets them from an honest sender, whose copies agree.
  To keep every unacknowledged byte comparable, a direction may run at most
  `HISTORY` bytes ahead of its receiver's acknowledgement; a segment past
  that is dropped (``inspect_window``) and retransmitted by its sender after
  the next acknowledgement: inspected flows are clamped to a 64 KiB window.
* A segment whose TCP or UDP checksum is wrong is dropped (``bad_checksum``)
  before it touches the stream: the host would discard it, so scanning it in
  place of the copy the host keeps is the classic evasion. Checksums the
  sending host left to offload (a GSO option) are not verified.
* IP fragments are reassembled before they reach a service (the ingress's
  job), so they are not handled here.

A match turns the flow to BLOCK: the matching packet and all later ones are
dropped (counter ``blocked``). Each direction is scanned for at most
`inspect_limit` bytes of its own (a server's 1 MiB does not end inspection
of its client); when both directions are past it, or when there are no
rules and the app is known, the flow turns to ALLOW and is no longer
scanned (nor mirrored per packet), as inspection engines do to bound cost.

What is mirrored: every change of action or application id, the SYNs, and
the stream state on every scanned payload packet: next expected sequence
number, acknowledged sequence number, bytes scanned and the carry-over, per
direction, so a pattern split across the failover point is still caught by
the promoted instance. Not mirrored: the history (up to 64 KiB per
direction, too big for a sync record), and acknowledgement-only updates.
A decoded state is therefore *recovering*, for `RECOVERY` seconds from its
first packet: a segment past the mirrored next sequence number (the mirror
lags the primary a little) is taken as the new stream position instead of
being dropped, an acknowledgement past it moves the stream there (the dead
primary forwarded those bytes), and retransmitted bytes it has no history
for are scanned on their own instead of compared. That is weaker than on
the primary, for the moment of a failover only, which no client can choose.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from dataplane.core.packet import TCP, TCP_ACK, TCP_RST, TCP_SYN, UDP, Inner, transport_checksum_ok
from dataplane.core.services import FORWARD, MAX_STATE, Action, Verdict

APP_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GET ", "http"), (b"POST ", "http"), (b"HEAD ", "http"), (b"PUT ", "http"),
    (b"DELETE ", "http"), (b"OPTIONS ", "http"), (b"HTTP/", "http"),
    (b"\x16\x03", "tls"), (b"SSH-", "ssh"),
)
UNKNOWN_AFTER = 3
"""Payload packets without a signature before the app id becomes 'unknown'."""
TIMEOUT = 600.0
HISTORY = 64 * 1024
"""Most bytes a direction may carry beyond its receiver's acknowledgement
while inspected: the bytes kept to compare retransmissions with."""
SEQ = 1 << 32
RECOVERY = 3.0
"""Seconds a promoted (decoded) state trusts the stream over its mirrored
position: long enough for the receiver to acknowledge what the dead
primary forwarded past the mirror, short enough that no client can plan on it."""

VERSION = 1
_HEAD = struct.Struct("!BBBBBQQ")
"""version, action, app length, matched length, payload packets, bytes, packets."""
_DIR = struct.Struct("!BIIQH")
"""Per direction: synced, next sequence number, acknowledged, bytes scanned, carry-over length."""


class FlowAction(IntEnum):
    INSPECT = 0
    ALLOW = 1
    BLOCK = 2


@dataclass(slots=True)
class Stream:
    """One direction's reassembly, as its receiver's TCP sees it.

    `nxt` is the next sequence number to scan, `acked` the highest the
    receiver acknowledged (never past `nxt`), `history` the scanned bytes
    in ``[nxt - len(history), nxt)`` the receiver has not acknowledged (kept
    locally only), `recovering` set on a state decoded from the mirror."""

    synced: bool = False
    nxt: int = 0
    acked: int = 0
    scanned: int = 0
    tail: bytes = b""
    history: bytearray = field(default_factory=bytearray, compare=False)
    recovering: bool = field(default=False, compare=False)
    recover_until: float = field(default=0.0, compare=False)

    def sync(self, seq: int) -> None:
        """Start the stream at `seq` (a SYN, a mid-stream pickup, a resync)."""
        self.synced, self.nxt, self.acked, self.tail = True, seq % SEQ, seq % SEQ, b""
        self.history.clear()

    def ack(self, ack: int) -> None:
        """The receiver acknowledged up to `ack`: forget the history before it.
        Acknowledgements past what was scanned are ignored (they may be
        forged, and a jump would skip bytes), except on a recovering state:
        there they are bytes the dead primary forwarded past the mirror, and
        the stream resumes at `ack` (else its sender, who will never send
        them again, would stall behind them)."""
        if not self.synced:
            return
        ahead = (ack - self.acked) % SEQ
        if self.recovering and (self.nxt - self.acked) % SEQ < ahead < SEQ >> 2:
            self.sync(ack)
        elif 0 < ahead <= (self.nxt - self.acked) % SEQ:
            self.acked = ack % SEQ
            excess = len(self.history) - (self.nxt - self.acked) % SEQ
            if excess > 0:
                del self.history[:excess]

    def clear(self) -> None:
        """No longer scanned: drop what only scanning needs."""
        self.tail = b""
        self.history = bytearray()


@dataclass(slots=True)
class InspectState:
    """Per-flow inspection state; `streams[0]` is the client-to-server stream."""

    action: FlowAction = FlowAction.INSPECT
    app: str = "inspecting"
    matched: str = ""
    payload_packets: int = 0
    bytes: int = 0
    packets: int = 0
    streams: list[Stream] = field(default_factory=lambda: [Stream(), Stream()])


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: bytes


class Inspection:
    """Per-flow action, app id, counters and content rules over reassembled streams."""

    name = "inspection"
    max_timeout = TIMEOUT

    def __init__(self, rules: list[dict[str, str]] | tuple[Rule, ...] = (),
                 inspect_limit: int = 1 << 20) -> None:
        self.rules = tuple(r if isinstance(r, Rule) else Rule(str(r["name"]), str(r["pattern"]).encode())
                           for r in rules)
        if any(not r.pattern for r in self.rules):
            raise ValueError("inspection rule with an empty pattern")
        if any(len(r.name.encode()) > 255 for r in self.rules):
            raise ValueError("inspection rule name longer than 255 bytes (the mirrored state's limit)")
        self.keep = max((len(r.pattern) for r in self.rules), default=1) - 1
        if _HEAD.size + 2 * _DIR.size + 2 * 255 + 2 * self.keep > MAX_STATE:
            raise ValueError("inspection rule pattern too long for the mirrored state")
        self.inspect_limit = inspect_limit

    def process(self, pkt: Inner, forward: bool, state: Any, now: float) -> tuple[Verdict, Any]:
        if pkt.icmp_error is not None:  # RELATED: passes with a live, unblocked flow; never scanned
            if state is None:
                return Verdict(Action.DROP, "icmp_unrelated"), None
            return (Verdict(Action.DROP, "blocked") if state.action == FlowAction.BLOCK else FORWARD), state
        st: InspectState = state if state is not None else InspectState()
        new = state is None
        st.packets += 1
        if st.action == FlowAction.BLOCK:
            return Verdict(Action.DROP, "blocked"), st
        data = bytes(pkt.payload)
        st.bytes += len(data)
        if st.action == FlowAction.ALLOW:
            return (Verdict(Action.FORWARD, mirror=True, timeout=TIMEOUT) if new else FORWARD), st
        d = 0 if forward else 1
        s = st.streams[d]
        changed = new
        if self.rules:
            for x in st.streams:
                if x.recovering:
                    if not x.recover_until:
                        x.recover_until = now + RECOVERY
                    elif now > x.recover_until:
                        x.recovering = False
            if pkt.proto == TCP and pkt.tcp_flags & TCP_ACK:
                st.streams[1 - d].ack(pkt.ack)
            if s.scanned >= self.inspect_limit:
                return (Verdict(Action.FORWARD, mirror=True, timeout=TIMEOUT) if new else FORWARD), st
            if (data or pkt.tcp_flags & TCP_SYN) and not transport_checksum_ok(pkt):
                return Verdict(Action.DROP, "bad_checksum"), (None if new else st)
            if pkt.proto == TCP:
                early, data, synced = self._reassemble(s, pkt, data)
                changed = changed or synced
                if early is not None:
                    return early, (None if new and early.action == Action.DROP else st)
        if not data:
            return (Verdict(Action.FORWARD, mirror=True, timeout=TIMEOUT) if changed else FORWARD), st
        st.payload_packets += 1
        changed = self._classify(st, data) or changed
        if self.rules:
            window = s.tail + data
            for rule in self.rules:
                if rule.pattern in window:
                    return self._block(st, rule), st
            s.tail = window[-self.keep:] if self.keep else b""
            s.scanned += len(data)
            if pkt.proto == TCP:
                s.nxt = (s.nxt + len(data)) % SEQ
                s.history += data
            if s.scanned >= self.inspect_limit:
                s.clear()
            changed = True
        done = all(x.scanned >= self.inspect_limit for x in st.streams)
        if done or (not self.rules and st.app != "inspecting"):
            st.action = FlowAction.ALLOW
            for x in st.streams:
                x.clear()
            changed = True
        return (Verdict(Action.FORWARD, mirror=True, timeout=TIMEOUT) if changed else FORWARD), st

    def _reassemble(self, s: Stream, pkt: Inner, data: bytes) -> tuple[Verdict | None, bytes, bool]:
        """Place a TCP segment in its direction's stream: (a verdict to give
        now, or None; the new in-order bytes to scan; whether the stream was
        (re)synchronised). Nothing of the stream moves until the new bytes
        are scanned."""
        seq, synced = pkt.seq, False
        if pkt.tcp_flags & TCP_SYN:
            if not s.synced or (not s.scanned and not s.history):
                s.sync(seq + 1)
                synced = True
            seq += 1
        if not data or pkt.tcp_flags & TCP_RST:
            return None, b"", synced  # a receiver delivers no RST payload
        if not s.synced:
            s.sync(seq)
            synced = True
        off = (seq - s.nxt) % SEQ
        if off >= SEQ >> 1:
            off -= SEQ
        if off > 0:
            if not s.recovering:
                return Verdict(Action.DROP, "out_of_order"), b"", synced
            s.sync(seq)  # the mirror lagged the primary: resume where the stream is
            off, synced = 0, True
        if off < 0:
            k = min(-off, len(data))
            if not self._same_as_scanned(s, off, data[:k]):
                return Verdict(Action.DROP, "overlap_mismatch"), b"", synced
            data = data[k:]
            if not data:
                return FORWARD, b"", synced
        if (s.nxt - s.acked) % SEQ + len(data) > HISTORY:
            return Verdict(Action.DROP, "inspect_window"), b"", synced
        return None, data, synced

    def _same_as_scanned(self, s: Stream, off: int, old: bytes) -> bool:
        """Whether retransmitted bytes starting `off` (< 0) before `s.nxt`
        agree with what was scanned there. Bytes the receiver acknowledged
        need not agree (it discards them); bytes older than the history
        (only on a recovering state) are scanned on their own instead."""
        start = len(s.history) + off
        unacked = (s.nxt - s.acked) % SEQ
        if start < 0:
            cut = min(-start, len(old))
            unverified = old[max(0, -off - unacked):cut]
            if any(r.pattern in unverified for r in self.rules):
                return False
            old, start = old[cut:], 0
        return bytes(s.history[start:start + len(old)]) == old

    def _block(self, st: InspectState, rule: Rule) -> Verdict:
        st.action, st.matched = FlowAction.BLOCK, rule.name
        for x in st.streams:
            x.clear()
        return Verdict(Action.DROP, "blocked", mirror=True)

    def fast(self, st: InspectState, forward: bool, data: bytes, proto: int, l4: int, end: int) -> bool:
        """`process` for a packet not scanned: of an allowed flow, or of a
        direction past its limit while the other is still inspected (a long
        download keeps its request direction inspected). Count, take the
        acknowledgement for the other direction, pass."""
        if st.action != FlowAction.ALLOW:
            if (st.action != FlowAction.INSPECT or not self.rules
                    or st.streams[0 if forward else 1].scanned < self.inspect_limit
                    or st.streams[0].recovering or st.streams[1].recovering):
                return False
        hl = 8 if proto == UDP else (data[l4 + 12] >> 4) * 4 if end - l4 >= 20 else 0
        if hl < 8 or l4 + hl > end:
            return False
        st.packets += 1
        st.bytes += end - l4 - hl
        if st.action == FlowAction.INSPECT and proto == TCP and data[l4 + 13] & TCP_ACK:
            st.streams[1 if forward else 0].ack(int.from_bytes(data[l4 + 8:l4 + 12], "big"))
        return True

    @staticmethod
    def _classify(st: InspectState, data: bytes) -> bool:
        if st.app != "inspecting":
            return False
        for prefix, app in APP_SIGNATURES:
            if data.startswith(prefix):
                st.app = app
                return True
        if st.payload_packets >= UNKNOWN_AFTER:
            st.app = "unknown"
            return True
        return False

    def moved(self, st: InspectState) -> InspectState:
        """A flow of this instance's own comes back after its stream went on
        through another instance: recover as a decoded state does (the
        positions held here are behind what the receiver got)."""
        for s in st.streams:
            s.recovering, s.recover_until = True, 0.0
        return st

    def encode_state(self, st: InspectState) -> bytes:
        app, matched = st.app.encode(), st.matched.encode()
        out = [_HEAD.pack(VERSION, st.action, len(app), len(matched), min(st.payload_packets, 255),
                          st.bytes, st.packets)]
        out += [_DIR.pack(s.synced, s.nxt, s.acked, s.scanned, len(s.tail)) for s in st.streams]
        return b"".join(out) + app + matched + st.streams[0].tail + st.streams[1].tail

    def decode_state(self, data: bytes) -> InspectState:
        """The mirrored state, *recovering* (see the module docstring); a
        ValueError for anything a primary could not have produced."""
        if len(data) < _HEAD.size + 2 * _DIR.size:
            raise ValueError("inspection state truncated")
        version, action, la, lm, pp, nbytes, pkts = _HEAD.unpack_from(data)
        if version != VERSION:
            raise ValueError(f"inspection state version {version}, not {VERSION}")
        dirs = [_DIR.unpack_from(data, _HEAD.size + i * _DIR.size) for i in (0, 1)]
        pos = _HEAD.size + 2 * _DIR.size
        if len(data) != pos + la + lm + dirs[0][4] + dirs[1][4]:
            raise ValueError("inspection state length mismatch")
        app = data[pos:pos + la].decode()
        pos += la
        matched = data[pos:pos + lm].decode()
        pos += lm
        streams = []
        for synced, nxt, acked, scanned, lt in dirs:
            if synced > 1 or lt > self.keep or scanned > nbytes:
                raise ValueError("inspection stream state out of range")
            if not synced and (nxt or acked):
                raise ValueError("inspection stream position without a start")
            if (nxt - acked) % SEQ > HISTORY:
                raise ValueError("inspection stream acknowledged too far behind")
            streams.append(Stream(bool(synced), nxt, acked, scanned, data[pos:pos + lt],
                                  recovering=True))
            pos += lt
        return InspectState(FlowAction(action), app, matched, pp, nbytes, pkts, streams)
