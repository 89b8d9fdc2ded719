"""A stateful firewall: TCP connection tracking plus UDP/ICMP pseudo-connections.

Theory of operation. A flow is admitted only by a packet that may open it:
a TCP SYN, or the first client-to-server UDP/ICMP-echo/other packet. Any
other packet of a flow the instance holds no state for is *misdelivery*: in a
mesh that is a mid-stream packet sent to an instance that never saw the
stream (a failover without state sync, a wrong map), so it is dropped and
counted. That is what makes state sync observable: without it, failover
breaks connections, visibly.

TCP follows the usual states (SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT,
CLOSING, TIME_WAIT, CLOSED) with transitions kept in code small enough to
read at once.

Sequence checks track each direction's window as Linux conntrack does
(nf_conntrack_proto_tcp.c, `tcp_in_window`): per direction `end` (highest
seq + len sent), `maxend` (highest ack + window the peer announced: how far
this direction may send), `maxwin` (largest window it announced) and
`maxack` (highest ack it sent: the peer's rcv_nxt as far as we can tell),
with window scaling from the SYN options (only when both SYNs carry it, RFC
7323). A segment passes when

    seq <= sender.maxend                    (not beyond what the peer allows)
    seq + len >= sender.end - receiver.maxwin   (not older than a window)
    ack <= receiver.end                     (acknowledges nothing unsent)
    ack >= receiver.end - sender.maxwin     (or 66,000 before any window)

else it is dropped (`out_of_window`, `ack_out_of_window`). Until a fixed
+-2^30 window was used, and 52 % of RSTs with a random sequence number closed
an established flow (issue #14, finding 5).

RSTs follow RFC 5961: one whose seq is exactly the receiver's next expected
byte (its last ack; or the sender's own `end`, a RST sent right after its
data) closes the flow; one inside the window but not exact is dropped and
counted (`rst_challenge`): an end host would answer it with a challenge ACK,
but a middlebox cannot (it would have to forge a segment from the host), so
it drops the RST and lets the hosts' own RFC 5961 logic work: a genuine
sender answers the receiver's next segment with a RST at exactly its ack,
which passes. A RST outside the window is `rst_out_of_window`.

The window state is flow state: mirrored to the secondary, and every
`SYNC_STRIDE` bytes of progress, not every packet (per-packet mirroring
would halve the forwarding rate). So a promoted secondary's copy lags the
stream by up to a stride, and segments sent through the old primary may
still be arriving. So a state loaded from the wire checks data with the old
+-2^30 window for `LAG_TIME` after its first packet and until it has seen
both directions, and meanwhile learns from what passes (an ack raises the
peer's `end`, a segment its sender's `maxend`), so the strict checks that
follow start from what the hosts know; RSTs are checked exactly from the
first packet on. A state that came from the 20-byte format of older
releases carries no window at all: it is *liberal* for good, like a flow
conntrack picked up mid-stream (no SYN seen).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from dataplane.core.packet import (ICMP, ICMP_ECHO, ICMPV6, TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
                              UDP, Inner, tcp_reset)
from dataplane.core.services import FORWARD, Action, Verdict

LIBERAL_WINDOW = 1 << 30
LAG_TIME = 3.0
"""Seconds a state loaded from the wire (a promoted replica), or a flow of
this instance's own that comes back REROUTED (`moved`), checks data loosely
after its first packet (RSTs are exact from the first packet on): long
enough for segments sent through the old primary to drain (a few RTTs) and
for the hosts to send both ways, short enough that an attacker gains
nothing lasting from a failover. (A minute was a stopgap while downloads
moved by a restart and scale-out stalled at 2 s; in four lab runs of that
scenario at 2 s nothing stalled any more, and a flow coming back to a stale
copy of its own, the one case that was still strict from its first packet,
now recovers as a promoted copy does.)"""
SYNC_STRIDE = 1 << 20
MOD = 1 << 32


class Kind(IntEnum):
    TCP = 1
    UDP = 2
    ICMP = 3
    OTHER = 4


class TcpState(IntEnum):
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSING = 5
    TIME_WAIT = 6
    CLOSED = 7


TCP_TIMEOUTS = {TcpState.SYN_SENT: 30.0, TcpState.SYN_RECV: 30.0, TcpState.ESTABLISHED: 600.0,
                TcpState.FIN_WAIT: 60.0, TcpState.CLOSING: 30.0, TcpState.TIME_WAIT: 10.0,
                TcpState.CLOSED: 5.0}
PSEUDO_TIMEOUTS = {Kind.UDP: (30.0, 120.0), Kind.ICMP: (10.0, 10.0), Kind.OTHER: (60.0, 120.0)}
"""(before a reply was seen, after) per pseudo-connection kind."""

_STATE_V1 = struct.Struct("!BBBB4I")
"""The 20-byte state of releases before window tracking: still decoded (liberal)."""
_STATE = struct.Struct("!BBBBBBBB10I")
"""version 2, kind, state, orig, fin, flags, scale0, scale1, then end, maxend,
maxwin, maxack per direction (0 then 1, interleaved) and synced0, synced1."""
STATE_VERSION = 2
_SEQ_ACK = struct.Struct("!IIBBH")
"""seq, ack, data offset, flags, window: bytes 4-15 of the TCP header."""
_ESTABLISHED, _KIND_TCP = int(TcpState.ESTABLISHED), int(Kind.TCP)
_PLAIN = TCP_SYN | TCP_FIN | TCP_RST | TCP_ACK
_KINDS = {int(k): k for k in Kind}
LIBERAL, ACKED0, ACKED1, WS0, WS1 = 1, 2, 4, 8, 16
"""FlowState.flags: no window known (old format); direction d has sent an
ACK (its maxack is valid); direction d's SYN carried a window scale."""
_ALL_FLAGS = LIBERAL | ACKED0 | ACKED1 | WS0 | WS1
MAX_SCALE = 14
MAX_WINDOW = 65535 << MAX_SCALE
NO_WINDOW_ACK = 66000
"""conntrack's MAXACKWINDOW before a direction announced any window."""


@dataclass(slots=True)
class FlowState:
    """Everything the firewall knows about one flow (mirrored as 48 bytes).

    Direction 0 is the originator's (who sent the SYN / first packet).
    """

    kind: Kind
    state: int = 0
    """TcpState for TCP; for pseudo-connections 1 once a reply was seen."""
    orig_forward: bool = True
    fin_seen: int = 0
    """Bit d set when direction d sent a FIN."""
    end0: int = 0
    end1: int = 0
    synced0: int = 0
    synced1: int = 0
    maxend0: int = 0
    maxend1: int = 0
    maxwin0: int = 0
    maxwin1: int = 0
    maxack0: int = 0
    maxack1: int = 0
    scale0: int = 0
    scale1: int = 0
    flags: int = 0
    fresh: int = field(default=3, compare=False)
    """Bit d: a packet of direction d passed since this state was built
    here; a decoded (mirrored) state starts at 0. Not mirrored."""
    lag_until: float = field(default=0.0, compare=False)
    """0: strict checks. A decoded state starts at -1 (loose; the clock
    starts at its first packet), then the time its loose checks end (see
    the module docstring). Not mirrored."""


def _seq_le(a: int, b: int) -> bool:
    """a <= b in 32-bit serial arithmetic."""
    return (b - a) % MOD < 1 << 31


def _after(a: int, b: int) -> bool:
    """a > b in 32-bit serial arithmetic."""
    return a != b and (a - b) % MOD < 1 << 31


def _near(a: int, b: int) -> bool:
    """Within the loose +-2^30 window (liberal and freshly loaded states)."""
    return (a - b) % MOD < LIBERAL_WINDOW or (b - a) % MOD < LIBERAL_WINDOW


class Firewall:
    """Stateful firewall service. New flows to `deny_ports` are dropped
    silently; new TCP connections to `reject_ports` are answered with a RST."""

    name = "firewall"
    max_timeout = max(max(TCP_TIMEOUTS.values()), max(t for p in PSEUDO_TIMEOUTS.values() for t in p))

    def __init__(self, deny_ports: list[int] | tuple[int, ...] = (),
                 reject_ports: list[int] | tuple[int, ...] = ()) -> None:
        self.deny_ports = frozenset(deny_ports)
        self.reject_ports = frozenset(reject_ports)

    def process(self, pkt: Inner, forward: bool, state: Any, now: float) -> tuple[Verdict, Any]:
        if pkt.proto == TCP and not pkt.fragment:
            return self._tcp(pkt, forward, state, now)
        if pkt.icmp_error is not None:
            return self._related(state)
        kind = Kind.UDP if pkt.proto == UDP else Kind.ICMP if pkt.proto in (ICMP, ICMPV6) else Kind.OTHER
        return self._pseudo(pkt, forward, state, kind)

    def established(self, st: FlowState) -> bool:
        """The flow's eviction class (`dataplane.core.flowtable`): TCP past
        the handshake and not torn down before it, a pseudo-connection once
        a reply came back."""
        if st.kind == Kind.TCP:
            return TcpState.ESTABLISHED <= st.state <= TcpState.TIME_WAIT
        return st.state == 1

    def fast(self, st: FlowState, forward: bool, data: bytes, proto: int, l4: int, end: int) -> bool:
        """`process` for the two common cases, on raw bytes: a pseudo-connection
        packet that changes nothing, and an in-window ACK of an established
        TCP connection (strict window, both directions seen) that does not
        pass the sync stride. Anything else (flags, window edges, state
        changes) returns False untouched."""
        if st.kind != _KIND_TCP:
            return proto != TCP and (forward == st.orig_forward or st.state == 1)
        if st.state != _ESTABLISHED or proto != TCP or end - l4 < 20 or st.lag_until or st.flags & LIBERAL:
            return False
        seq, ack, off, flags, win = _SEQ_ACK.unpack_from(data, l4 + 4)
        hl = (off >> 4) * 4
        if flags & _PLAIN != TCP_ACK or hl < 20 or l4 + hl > end:
            return False
        d = 0 if forward == st.orig_forward else 1
        seg_end = (seq + end - l4 - hl) % MOD
        if self._check(st, d, seq, seg_end, ack) is not None:
            return False
        if d == 0:
            top, synced = (seg_end if _after(seg_end, st.end0) else st.end0), st.synced0
        else:
            top, synced = (seg_end if _after(seg_end, st.end1) else st.end1), st.synced1
        if (top - synced) % MOD >= SYNC_STRIDE:
            return False
        self._update(st, d, seg_end, ack, win)
        return True

    # -- RELATED: ICMP errors ---------------------------------------------------------

    @staticmethod
    def _related(st: FlowState | None) -> tuple[Verdict, Any]:
        """An ICMP error is judged by the flow it quotes (the node hands over
        that flow's state, `dataplane.core.node.related_key`): it passes
        when the flow is live here, as conntrack's RELATED, so path MTU
        discovery and port unreachables work; it never opens or changes a
        flow."""
        if st is None:
            return Verdict(Action.DROP, "icmp_unrelated"), None
        return FORWARD, st

    # -- pseudo-connections ---------------------------------------------------------

    def _pseudo(self, pkt: Inner, forward: bool, st: FlowState | None,
                kind: Kind) -> tuple[Verdict, Any]:
        if st is None:
            if not forward:
                return Verdict(Action.DROP, "misdelivery"), None
            if kind == Kind.ICMP and not _is_echo_request(pkt):
                return Verdict(Action.DROP, "misdelivery"), None
            if pkt.dport in self.deny_ports:
                return Verdict(Action.DROP, "policy_denied"), None
            st = FlowState(kind, orig_forward=True)
            return Verdict(Action.FORWARD, mirror=True, timeout=PSEUDO_TIMEOUTS[kind][0]), st
        if forward != st.orig_forward and st.state == 0:
            st.state = 1
            return Verdict(Action.FORWARD, mirror=True, timeout=PSEUDO_TIMEOUTS[kind][1]), st
        return FORWARD, st

    # -- TCP ----------------------------------------------------------------------------

    def _tcp(self, pkt: Inner, forward: bool, st: FlowState | None, now: float) -> tuple[Verdict, Any]:
        flags = pkt.tcp_flags
        syn, ack, rst, fin = flags & TCP_SYN, flags & TCP_ACK, flags & TCP_RST, flags & TCP_FIN
        if st is None or (syn and not ack and st.state in (TcpState.TIME_WAIT, TcpState.CLOSED)):
            if not syn or ack or rst:
                return Verdict(Action.DROP, "misdelivery"), st
            if pkt.dport in self.deny_ports:
                return Verdict(Action.DROP, "policy_denied"), st
            if pkt.dport in self.reject_ports:
                return Verdict(Action.REPLY, "policy_rejected", reply=tcp_reset(pkt)), st
            end = (pkt.seq + 1 + len(pkt.payload)) % MOD
            ws = pkt.wscale
            st = FlowState(Kind.TCP, TcpState.SYN_SENT, forward, 0, end, 0, end, 0, maxend0=end,
                           maxwin0=max(pkt.window, 1), scale0=max(ws, 0), flags=WS0 if ws >= 0 else 0)
            return self._moved(st), st
        d = 0 if forward == st.orig_forward else 1
        if st.lag_until:  # loaded from the wire: loose until it caught up
            if st.lag_until < 0:
                st.lag_until = now + LAG_TIME
            elif now >= st.lag_until and st.fresh == 3:
                st.lag_until = 0.0
        if rst:
            return self._rst(pkt, st, d, ack)
        if syn:
            return self._syn(pkt, st, d, ack)
        seg_end = (pkt.seq + len(pkt.payload) + (1 if fin else 0)) % MOD
        ack_no = pkt.ack if ack else None
        reason = self._check(st, d, pkt.seq, seg_end, ack_no)
        if reason is not None:
            return Verdict(Action.DROP, reason), st
        self._update(st, d, seg_end, ack_no, pkt.window)
        before = st.state
        if st.state == TcpState.SYN_RECV and d == 0 and ack:
            st.state = TcpState.ESTABLISHED
        if fin and st.state in (TcpState.SYN_RECV, TcpState.ESTABLISHED, TcpState.FIN_WAIT):
            st.fin_seen |= 1 << d
            st.state = TcpState.CLOSING if st.fin_seen == 3 else TcpState.FIN_WAIT
        elif st.state == TcpState.CLOSING and ack and not fin:
            st.state = TcpState.TIME_WAIT
        if st.state != before or self._stride_passed(st):
            return self._moved(st), st
        return FORWARD, st

    def _syn(self, pkt: Inner, st: FlowState, d: int, ack: int) -> tuple[Verdict, Any]:
        if d == 0 and not ack:  # retransmitted SYN
            return FORWARD, st
        if d == 1 and ack and st.state in (TcpState.SYN_SENT, TcpState.SYN_RECV):
            if pkt.ack != st.end0:
                return Verdict(Action.DROP, "ack_out_of_window"), st
            end = (pkt.seq + 1 + len(pkt.payload)) % MOD
            st.end1 = st.synced1 = st.maxend1 = end
            st.maxwin1 = max(pkt.window, 1)
            ws = pkt.wscale
            st.flags = (st.flags & ~WS1) | (WS1 if ws >= 0 else 0) | ACKED1
            if st.flags & (WS0 | WS1) == WS0 | WS1:
                st.scale1 = ws
            else:  # window scaling only when both sides offered it (RFC 7323)
                st.scale0 = st.scale1 = 0
            st.maxack1 = pkt.ack
            top = (pkt.ack + pkt.window) % MOD  # a SYN's window is never scaled
            if _after(top, st.maxend0):
                st.maxend0 = top
            st.fresh |= 2
            before, st.state = st.state, TcpState.SYN_RECV
            return (self._moved(st) if before != st.state else FORWARD), st
        if d == 1 and ack:  # SYN/ACK retransmitted after the handshake
            return FORWARD, st
        return Verdict(Action.DROP, "unexpected_syn"), st

    def _rst(self, pkt: Inner, st: FlowState, d: int, ack: int) -> tuple[Verdict, Any]:
        """RFC 5961 section 3 for a middlebox (see the module docstring)."""
        seq = pkt.seq
        if st.state == TcpState.SYN_SENT:
            # the answer to the SYN must acknowledge it; the originator's own
            # abort carries the sequence number after its SYN
            exact = bool(ack) and pkt.ack == st.end0 if d == 1 else seq == st.end0
            if not exact:
                return Verdict(Action.DROP, "rst_out_of_window"), st
        elif not self._rst_exact(st, d, seq):
            in_window = self._check(st, d, seq, seq, None) is None
            return Verdict(Action.DROP, "rst_challenge" if in_window else "rst_out_of_window"), st
        st.state = TcpState.CLOSED
        return Verdict(Action.FORWARD, mirror=True, timeout=TCP_TIMEOUTS[TcpState.CLOSED]), st

    @staticmethod
    def _rst_exact(st: FlowState, d: int, seq: int) -> bool:
        """seq is the receiver's next expected byte: its last ack, or the
        sender's end (a RST right behind the sender's own data)."""
        if d == 0:
            return seq == st.end0 or (bool(st.flags & ACKED1) and seq == st.maxack1)
        return seq == st.end1 or (bool(st.flags & ACKED0) and seq == st.maxack0)

    @staticmethod
    def _check(st: FlowState, d: int, seq: int, end: int, ack: int | None) -> str | None:
        """conntrack's four window checks for a segment [seq, end) of
        direction d acknowledging `ack` (None: no ACK flag); the drop reason,
        or None when it passes. Loose (+-2^30 around `end`) for a liberal
        state and for a state loaded from the wire while it catches up."""
        if d == 0:
            s_end, s_maxend, s_maxwin, r_end, r_maxwin = st.end0, st.maxend0, st.maxwin0, st.end1, st.maxwin1
        else:
            s_end, s_maxend, s_maxwin, r_end, r_maxwin = st.end1, st.maxend1, st.maxwin1, st.end0, st.maxwin0
        if st.flags & LIBERAL or st.lag_until:
            if not _near(seq, s_end):
                return "out_of_window"
            if ack is not None and not _near(ack, r_end):
                return "ack_out_of_window"
            return None
        if not _seq_le(seq, s_maxend) or (r_maxwin and not _seq_le((s_end - r_maxwin) % MOD, end)):
            return "out_of_window"
        if ack is not None and (not _seq_le(ack, r_end)
                                or not _seq_le((r_end - (s_maxwin or NO_WINDOW_ACK)) % MOD, ack)):
            return "ack_out_of_window"
        return None

    @staticmethod
    def _update(st: FlowState, d: int, end: int, ack: int | None, win: int) -> None:
        """What a passing segment teaches (conntrack's update after the
        checks): the sender's end and largest window, its ack, and how far
        the receiver may now send (ack + window). A loose state also learns
        that the peer sent at least what is acked, and that the sender was
        allowed to send what it sent."""
        st.fresh |= 1 << d
        if st.flags & LIBERAL or st.lag_until:
            if d == 0:
                if ack is not None and _after(ack, st.end1):
                    st.end1 = ack
                if _after(end, st.maxend0):
                    st.maxend0 = end
            else:
                if ack is not None and _after(ack, st.end0):
                    st.end0 = ack
                if _after(end, st.maxend1):
                    st.maxend1 = end
        if d == 0:
            swin = win << st.scale0
            if swin > st.maxwin0:
                st.maxwin0 = min(swin, MAX_WINDOW)
            if _after(end, st.end0):
                st.end0 = end
            if ack is not None:
                if not st.flags & ACKED0 or _after(ack, st.maxack0):
                    st.maxack0 = ack
                    st.flags |= ACKED0
                top = (ack + (swin or 1)) % MOD
                if _after(top, st.maxend1):
                    st.maxend1 = top
        else:
            swin = win << st.scale1
            if swin > st.maxwin1:
                st.maxwin1 = min(swin, MAX_WINDOW)
            if _after(end, st.end1):
                st.end1 = end
            if ack is not None:
                if not st.flags & ACKED1 or _after(ack, st.maxack1):
                    st.maxack1 = ack
                    st.flags |= ACKED1
                top = (ack + (swin or 1)) % MOD
                if _after(top, st.maxend0):
                    st.maxend0 = top

    @staticmethod
    def _stride_passed(st: FlowState) -> bool:
        return ((st.end0 - st.synced0) % MOD >= SYNC_STRIDE
                or (st.end1 - st.synced1) % MOD >= SYNC_STRIDE)

    @staticmethod
    def _moved(st: FlowState) -> Verdict:
        """A change worth mirroring: remember what the replica will know."""
        st.synced0, st.synced1 = st.end0, st.end1
        return Verdict(Action.FORWARD, mirror=True, timeout=TCP_TIMEOUTS[st.state])

    def moved(self, st: FlowState) -> FlowState:
        """A flow of this instance's own comes back REROUTED after it ran
        through another instance: the window held here is behind the
        stream, so check loosely until it caught up, as a promoted copy does."""
        if st.kind == Kind.TCP:
            st.lag_until, st.fresh = -1.0, 0
        return st

    # -- state on the wire -------------------------------------------------------------

    def encode_state(self, st: FlowState) -> bytes:
        return _STATE.pack(STATE_VERSION, st.kind, st.state, st.orig_forward, st.fin_seen, st.flags,
                           st.scale0, st.scale1, st.end0, st.end1, st.maxend0, st.maxend1,
                           st.maxwin0, st.maxwin1, st.maxack0, st.maxack1, st.synced0, st.synced1)

    def decode_state(self, data: bytes) -> FlowState:
        """The mirrored state, validated field by field (a state that decodes
        is one the firewall can run); the 20-byte state of older releases is
        read as a liberal one. Only `ValueError`, for anything else."""
        if len(data) == _STATE_V1.size:
            kind, state, orig, fin, e0, e1, s0, s1 = _STATE_V1.unpack(data)
            st = FlowState(self._kind(kind), state, bool(orig), fin, e0, e1, s0, s1,
                           maxend0=e0, maxend1=e1, flags=LIBERAL if kind == _KIND_TCP else 0, fresh=0,
                           lag_until=-1.0)
            raw_orig = orig
        elif len(data) == _STATE.size:
            (version, kind, state, orig, fin, flags, sc0, sc1, e0, e1, me0, me1, mw0, mw1, ma0, ma1,
             s0, s1) = _STATE.unpack(data)
            if version != STATE_VERSION:
                raise ValueError(f"firewall state version {version}, this release reads {STATE_VERSION}")
            if flags & ~_ALL_FLAGS or sc0 > MAX_SCALE or sc1 > MAX_SCALE or max(mw0, mw1) > MAX_WINDOW:
                raise ValueError("firewall state with unknown flags or an impossible window")
            st = FlowState(self._kind(kind), state, bool(orig), fin, e0, e1, s0, s1, me0, me1, mw0, mw1,
                           ma0, ma1, sc0, sc1, flags, fresh=0, lag_until=-1.0)
            raw_orig = orig
        else:
            raise ValueError(f"firewall state is {_STATE.size} (or {_STATE_V1.size}) bytes, got {len(data)}")
        if raw_orig > 1 or st.fin_seen > 3:
            raise ValueError("firewall state with an impossible direction or FIN mask")
        if st.kind == Kind.TCP:
            if not TcpState.SYN_SENT <= st.state <= TcpState.CLOSED:
                raise ValueError(f"firewall state with unknown TCP state {st.state}")
        elif st.state > 1 or st.fin_seen or any((st.end0, st.end1, st.synced0, st.synced1, st.maxend0,
                                                 st.maxend1, st.maxwin0, st.maxwin1, st.maxack0,
                                                 st.maxack1, st.scale0, st.scale1, st.flags)):
            raise ValueError("firewall pseudo-connection state with TCP fields")
        return st

    @staticmethod
    def _kind(kind: int) -> Kind:
        k = _KINDS.get(kind)
        if k is None:
            raise ValueError(f"firewall state of unknown kind {kind}")
        return k


def _is_echo_request(pkt: Inner) -> bool:
    seg = pkt.payload
    return len(seg) >= 1 and seg[0] == ICMP_ECHO[pkt.proto][0]

