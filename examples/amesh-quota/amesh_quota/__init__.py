"""A per-flow packet quota: an affinity-mesh service kind from another package.

Each flow may send `max_packets` packets (both directions together); the
rest are dropped as `policy_denied` (a documented drop reason, so the
drops show under that label in `amesh_drops_total`). The count is the
flow's state, mirrored to the secondary when the flow opens, every
`sync_every` packets and when the quota runs out, so after a failover the
promoted secondary goes on counting from at most `sync_every` behind.

The state on the wire is 5 bytes: a version (1) and the count (uint32),
and `decode_state` refuses anything else with ValueError, as the Service
interface asks (see `dataplane.core.services`).

Installed with ``pip install -e examples/amesh-quota``; its pyproject names
the kind in the entry point group ``affinity_mesh.services``.
"""

from __future__ import annotations

import struct
from typing import Any

from dataplane.core.packet import Inner
from dataplane.core.services import FORWARD, Action, Verdict

STATE_VERSION = 1
_STATE = struct.Struct("!BI")
TIMEOUT = 120.0


class Quota:
    name = "quota"
    max_timeout = TIMEOUT

    def __init__(self, max_packets: int = 1000, sync_every: int = 100) -> None:
        for key, value in (("max_packets", max_packets), ("sync_every", sync_every)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**32:
                raise ValueError(f"quota {key} must be an integer from 1 to 2^32-1, got {value!r}")
        self.max_packets, self.sync_every = max_packets, sync_every

    def process(self, pkt: Inner, forward: bool, state: Any, now: float) -> tuple[Verdict, Any]:
        count = (state or 0) + 1
        if count > self.max_packets:
            count = min(count, 2**32 - 1)
            return Verdict(Action.DROP, "policy_denied", mirror=count == self.max_packets + 1), count
        if state is None or count % self.sync_every == 0:
            return Verdict(Action.FORWARD, mirror=True, timeout=TIMEOUT), count
        return FORWARD, count

    def encode_state(self, count: int) -> bytes:
        return _STATE.pack(STATE_VERSION, count)

    def decode_state(self, data: bytes) -> int:
        if len(data) != _STATE.size:
            raise ValueError(f"quota state is {_STATE.size} bytes, got {len(data)}")
        version, count = _STATE.unpack(data)
        if version != STATE_VERSION:
            raise ValueError(f"quota state version {version}, expected {STATE_VERSION}")
        return count
