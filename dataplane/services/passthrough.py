"""A stateless service that forwards everything: the baseline for benchmarks
and the simplest thing a lab can chain."""

from __future__ import annotations

from typing import Any

from dataplane.packet import Inner
from dataplane.services import FORWARD, Verdict


class Passthrough:
    name = "passthrough"
    max_timeout = 60.0

    def process(self, pkt: Inner, forward: bool, state: Any, now: float) -> tuple[Verdict, Any]:
        return FORWARD, state

    def encode_state(self, state: Any) -> bytes:
        return b""

    def decode_state(self, data: bytes) -> Any:
        return None
