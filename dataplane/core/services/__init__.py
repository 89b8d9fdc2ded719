"""Security services behind one small interface, registered by name.

A service sees one inner packet at a time with its flow's state and returns
a `Verdict`: forward, drop (with a reason that becomes a counter), or reply,
and whether the flow's state changed in a way the secondary must mirror.
Services never do I/O and never keep per-flow data outside the state object
they return, so that state can be mirrored byte for byte: `encode_state` and
`decode_state` are its wire form.

A service may also offer `fast(state, forward, data, proto, l4, end)`, the
common packet of a known flow on raw bytes: it returns True when the packet is
forwarded with no change worth mirroring (updating `state` in place if it
must), and False, touching nothing, for anything else, which then takes
`process`. The node's exact-match cache calls it instead of parsing the
packet (`dataplane.core.node`); a service without it always takes `process`.

A lab topology names services by their registry name (`SERVICES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from dataplane.core.packet import Inner


class Action(str, Enum):
    FORWARD = "forward"
    DROP = "drop"
    REPLY = "reply"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a packet, and whether its flow state must be mirrored."""

    action: Action
    reason: str = ""
    """Drop counter name when action is DROP."""
    mirror: bool = False
    timeout: float | None = None
    """New idle timeout for the flow, when the service's state machine sets one."""
    reply: bytes = b""


FORWARD = Verdict(Action.FORWARD)


class Service(Protocol):
    """The interface every service implements."""

    name: str
    max_timeout: float
    """Longest idle timeout a flow of this service can have."""

    def process(self, pkt: Inner, forward: bool, state: Any, now: float) -> tuple[Verdict, Any]:
        """Handle one packet. `forward` is True in the client-to-server
        direction, `state` is None for a flow the instance has never seen.
        Returns the verdict and the (possibly new) state."""
        ...

    def encode_state(self, state: Any) -> bytes: ...

    def decode_state(self, data: bytes) -> Any: ...


def registry() -> dict[str, type]:
    """Service classes by the name a topology uses."""
    from dataplane.core.services.firewall import Firewall
    from dataplane.core.services.inspection import Inspection
    from dataplane.core.services.passthrough import Passthrough

    return {"firewall": Firewall, "inspection": Inspection, "passthrough": Passthrough}


def create(name: str, **options: Any) -> Service:
    """Instantiate a registered service; unknown names are a clear error."""
    classes = registry()
    if name not in classes:
        raise ValueError(f"unknown service kind {name!r}; known: {', '.join(sorted(classes))}")
    return classes[name](**options)
