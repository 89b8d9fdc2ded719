"""An inspection service in the patent's image: allow / block / inspect per flow.

Each flow starts in INSPECT with application id "inspecting". The first
payload decides the application (http, tls, ssh, or unknown after a few
packets without a clue). Content rules (byte patterns) are searched in each
direction's byte stream, *across packet boundaries*: the last
``len(longest pattern) - 1`` bytes of each direction are kept as the flow's
partial-match state, so a pattern split over two packets still matches. That
tail is per-flow state like any other: it is mirrored to the secondary, so a
pattern split across the failover point is still caught by the promoted
instance.

A match turns the flow to BLOCK: the matching packet and all later ones are
dropped (counter ``blocked``). After `inspect_limit` bytes without a match
the flow turns to ALLOW and is no longer scanned (and no longer mirrored for
every payload packet), as inspection engines do to bound their cost.

What is mirrored: every change of action or application id, and the tails on
every payload packet while the flow is inspected.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from dataplane.core.packet import UDP, Inner
from dataplane.core.services import FORWARD, Action, Verdict

APP_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GET ", "http"), (b"POST ", "http"), (b"HEAD ", "http"), (b"PUT ", "http"),
    (b"DELETE ", "http"), (b"OPTIONS ", "http"), (b"HTTP/", "http"),
    (b"\x16\x03", "tls"), (b"SSH-", "ssh"),
)
UNKNOWN_AFTER = 3
"""Payload packets without a signature before the app id becomes 'unknown'."""
TIMEOUT = 600.0

_HEAD = struct.Struct("!BBBBQQHH")


class FlowAction(IntEnum):
    INSPECT = 0
    ALLOW = 1
    BLOCK = 2


@dataclass(slots=True)
class InspectState:
    """Per-flow inspection state; `tails[0]` is the client-to-server stream's."""

    action: FlowAction = FlowAction.INSPECT
    app: str = "inspecting"
    matched: str = ""
    payload_packets: int = 0
    bytes: int = 0
    packets: int = 0
    tails: list[bytes] = field(default_factory=lambda: [b"", b""])


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: bytes


class Inspection:
    """Per-flow action, app id, counters and cross-packet content rules."""

    name = "inspection"
    max_timeout = TIMEOUT

    def __init__(self, rules: list[dict[str, str]] | tuple[Rule, ...] = (),
                 inspect_limit: int = 1 << 20) -> None:
        self.rules = tuple(r if isinstance(r, Rule) else Rule(str(r["name"]), str(r["pattern"]).encode())
                           for r in rules)
        if any(not r.pattern for r in self.rules):
            raise ValueError("inspection rule with an empty pattern")
        self.keep = max((len(r.pattern) for r in self.rules), default=1) - 1
        self.inspect_limit = inspect_limit

    def process(self, pkt: Inner, forward: bool, state: Any, now: float) -> tuple[Verdict, Any]:
        st: InspectState = state if state is not None else InspectState()
        new = state is None
        st.packets += 1
        if st.action == FlowAction.BLOCK:
            return Verdict(Action.DROP, "blocked"), st
        data = bytes(pkt.payload)
        if not data or st.action == FlowAction.ALLOW:
            st.bytes += len(data)
            return (Verdict(Action.FORWARD, mirror=True, timeout=TIMEOUT) if new else FORWARD), st
        st.bytes += len(data)
        st.payload_packets += 1
        changed = self._classify(st, data) or new
        d = 0 if forward else 1
        if self.rules:
            window = st.tails[d] + data
            for rule in self.rules:
                if rule.pattern in window:
                    st.action, st.matched = FlowAction.BLOCK, rule.name
                    st.tails = [b"", b""]
                    return Verdict(Action.DROP, "blocked", mirror=True), st
            st.tails[d] = window[-self.keep:] if self.keep else b""
            changed = True
        if st.bytes >= self.inspect_limit or (not self.rules and st.app != "inspecting"):
            if st.action != FlowAction.ALLOW:
                st.action, st.tails = FlowAction.ALLOW, [b"", b""]
                changed = True
        return (Verdict(Action.FORWARD, mirror=True, timeout=TIMEOUT) if changed else FORWARD), st

    def fast(self, st: InspectState, forward: bool, data: bytes, proto: int, l4: int, end: int) -> bool:
        """`process` for an allowed flow (no longer scanned): count and pass."""
        if st.action != FlowAction.ALLOW:
            return False
        hl = 8 if proto == UDP else (data[l4 + 12] >> 4) * 4 if end - l4 >= 20 else 0
        if hl < 8 or l4 + hl > end:
            return False
        st.packets += 1
        st.bytes += end - l4 - hl
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

    def encode_state(self, st: InspectState) -> bytes:
        app, matched = st.app.encode(), st.matched.encode()
        return (_HEAD.pack(st.action, len(app), len(matched), min(st.payload_packets, 255),
                           st.bytes, st.packets, len(st.tails[0]), len(st.tails[1]))
                + app + matched + st.tails[0] + st.tails[1])

    def decode_state(self, data: bytes) -> InspectState:
        if len(data) < _HEAD.size:
            raise ValueError("inspection state truncated")
        action, la, lm, pp, nbytes, pkts, t0, t1 = _HEAD.unpack_from(data)
        if len(data) != _HEAD.size + la + lm + t0 + t1:
            raise ValueError("inspection state length mismatch")
        pos = _HEAD.size
        app = data[pos:pos + la].decode(errors="replace")
        pos += la
        matched = data[pos:pos + lm].decode(errors="replace")
        pos += lm
        tails = [data[pos:pos + t0], data[pos + t0:pos + t0 + t1]]
        return InspectState(FlowAction(action), app, matched, pp, nbytes, pkts, tails)
