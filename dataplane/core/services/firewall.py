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
read at once. Sequence checks are deliberately *liberal*: a segment must
start within `LIBERAL_WINDOW` of the highest sequence seen in its direction
and acknowledge no more than that of the other direction plus the window.
A promoted secondary knows the sequence state as of the last mirror (at most
`SYNC_STRIDE` bytes behind per direction), so the window must be far wider
than that. Grossly wrong segments (blind injection far outside the stream)
are still dropped.

What is mirrored: every state transition, and sequence progress every
`SYNC_STRIDE` bytes, not every packet: per-packet mirroring would halve the
forwarding rate for no gain in survivability.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from dataplane.core.packet import (ICMP, ICMP_ECHO, ICMPV6, TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
                              UDP, Inner, tcp_reset)
from dataplane.core.services import FORWARD, Action, Verdict

LIBERAL_WINDOW = 1 << 30
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

_STATE = struct.Struct("!BBBB4I")
_SEQ_ACK = struct.Struct("!IIBB")
"""seq, ack, data offset, flags: bytes 4-13 of the TCP header."""
_ESTABLISHED, _KIND_TCP = int(TcpState.ESTABLISHED), int(Kind.TCP)
_PLAIN = TCP_SYN | TCP_FIN | TCP_RST | TCP_ACK
_KINDS = {int(k): k for k in Kind}


@dataclass(slots=True)
class FlowState:
    """Everything the firewall knows about one flow (mirrored as 20 bytes).

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


def _seq_le(a: int, b: int) -> bool:
    """a <= b in 32-bit serial arithmetic."""
    return (b - a) % MOD < 1 << 31


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
            return self._tcp(pkt, forward, state)
        if pkt.proto in ICMP_ECHO and pkt.icmp_error is not None:
            return FORWARD, state  # errors about a flow travel with it
        kind = Kind.UDP if pkt.proto == UDP else Kind.ICMP if pkt.proto in (ICMP, ICMPV6) else Kind.OTHER
        return self._pseudo(pkt, forward, state, kind)

    def fast(self, st: FlowState, forward: bool, data: bytes, proto: int, l4: int, end: int) -> bool:
        """`process` for the two common cases, on raw bytes: a pseudo-connection
        packet that changes nothing, and an in-window ACK of an established
        TCP connection that does not pass the sync stride. Anything else
        (flags, window edges, state changes) returns False untouched."""
        if st.kind != _KIND_TCP:
            return proto != TCP and (forward == st.orig_forward or st.state == 1)
        if st.state != _ESTABLISHED or proto != TCP or end - l4 < 20:
            return False
        seq, ack, off, flags = _SEQ_ACK.unpack_from(data, l4 + 4)
        hl = (off >> 4) * 4
        if flags & _PLAIN != TCP_ACK or hl < 20 or l4 + hl > end:
            return False
        d = 0 if forward == st.orig_forward else 1
        if not self._seq_ok(st, d, seq) or not self._ack_ok(st, d, ack):
            return False
        seg_end = (seq + end - l4 - hl) % MOD
        end0, end1 = st.end0, st.end1
        if d == 0 and _seq_le(end0, seg_end):
            end0 = seg_end
        elif d == 1 and _seq_le(end1, seg_end):
            end1 = seg_end
        if (end0 - st.synced0) % MOD >= SYNC_STRIDE or (end1 - st.synced1) % MOD >= SYNC_STRIDE:
            return False
        st.end0, st.end1 = end0, end1
        return True

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

    def _tcp(self, pkt: Inner, forward: bool, st: FlowState | None) -> tuple[Verdict, Any]:
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
            st = FlowState(Kind.TCP, TcpState.SYN_SENT, forward, 0, end, 0, end, 0)
            return self._moved(st), st
        d = 0 if forward == st.orig_forward else 1
        if rst:
            if not self._seq_ok(st, d, pkt.seq):
                return Verdict(Action.DROP, "rst_out_of_window"), st
            st.state = TcpState.CLOSED
            return Verdict(Action.FORWARD, mirror=True, timeout=TCP_TIMEOUTS[TcpState.CLOSED]), st
        if syn:
            return self._syn(pkt, st, d, ack)
        if not self._seq_ok(st, d, pkt.seq):
            return Verdict(Action.DROP, "out_of_window"), st
        if ack and not self._ack_ok(st, d, pkt.ack):
            return Verdict(Action.DROP, "ack_out_of_window"), st
        before = st.state
        self._advance(st, d, (pkt.seq + len(pkt.payload) + (1 if fin else 0)) % MOD)
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
            if not _seq_le(pkt.ack, st.end0) or not _seq_le(st.end0, pkt.ack):
                return Verdict(Action.DROP, "ack_out_of_window"), st
            st.end1 = st.synced1 = (pkt.seq + 1) % MOD
            before, st.state = st.state, TcpState.SYN_RECV
            return (self._moved(st) if before != st.state else FORWARD), st
        if d == 1 and ack:  # SYN/ACK retransmitted after the handshake
            return FORWARD, st
        return Verdict(Action.DROP, "unexpected_syn"), st

    @staticmethod
    def _seq_ok(st: FlowState, d: int, seq: int) -> bool:
        end = st.end0 if d == 0 else st.end1
        if d == 1 and st.state == TcpState.SYN_SENT:
            return True
        return (seq - end) % MOD < LIBERAL_WINDOW or (end - seq) % MOD < LIBERAL_WINDOW

    @staticmethod
    def _ack_ok(st: FlowState, d: int, ack: int) -> bool:
        other = st.end1 if d == 0 else st.end0
        if d == 0 and st.state == TcpState.SYN_SENT:
            return True
        return (ack - other) % MOD <= LIBERAL_WINDOW or (other - ack) % MOD < LIBERAL_WINDOW

    @staticmethod
    def _advance(st: FlowState, d: int, seg_end: int) -> None:
        if d == 0 and _seq_le(st.end0, seg_end):
            st.end0 = seg_end
        elif d == 1 and _seq_le(st.end1, seg_end):
            st.end1 = seg_end

    @staticmethod
    def _stride_passed(st: FlowState) -> bool:
        return ((st.end0 - st.synced0) % MOD >= SYNC_STRIDE
                or (st.end1 - st.synced1) % MOD >= SYNC_STRIDE)

    @staticmethod
    def _moved(st: FlowState) -> Verdict:
        """A change worth mirroring: remember what the replica will know."""
        st.synced0, st.synced1 = st.end0, st.end1
        return Verdict(Action.FORWARD, mirror=True, timeout=TCP_TIMEOUTS[st.state])

    # -- state on the wire -------------------------------------------------------------

    def encode_state(self, st: FlowState) -> bytes:
        return _STATE.pack(st.kind, st.state, st.orig_forward, st.fin_seen,
                           st.end0, st.end1, st.synced0, st.synced1)

    def decode_state(self, data: bytes) -> FlowState:
        if len(data) != _STATE.size:
            raise ValueError(f"firewall state is {_STATE.size} bytes, got {len(data)}")
        kind, state, orig, fin, e0, e1, s0, s1 = _STATE.unpack(data)
        k = _KINDS.get(kind)
        if k is None:
            raise ValueError(f"firewall state of unknown kind {kind}")
        return FlowState(k, state, bool(orig), fin, e0, e1, s0, s1)


def _is_echo_request(pkt: Inner) -> bool:
    seg = pkt.payload
    return len(seg) >= 1 and seg[0] == ICMP_ECHO[pkt.proto][0]

