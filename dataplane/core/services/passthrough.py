"""A service that forwards everything: the baseline for benchmarks and the
simplest thing a lab can chain. Its only per-flow state is that the flow
exists (`True`), which is what pins the flow's hops and gets them mirrored."""

from __future__ import annotations

from typing import Any

from dataplane.core.packet import Inner
from dataplane.core.services import FORWARD, Action, Verdict

_NEW = Verdict(Action.FORWARD, mirror=True)


class Passthrough:
    name = "passthrough"
    max_timeout = 60.0

    def process(self, pkt: Inner, forward: bool, state: Any, now: float) -> tuple[Verdict, Any]:
        return (FORWARD if state else _NEW), True

    def fast(self, state: Any, forward: bool, data: bytes, proto: int, l4: int, end: int) -> bool:
        return True

    def encode_state(self, state: Any) -> bytes:
        return b""

    def decode_state(self, data: bytes) -> Any:
        return True
