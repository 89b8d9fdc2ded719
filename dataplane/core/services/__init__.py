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
packet (`dataplane.core.node`), only for an unfragmented IPv4 TCP or UDP
packet of the flow's protocol, whole, whose transport header the parser
would accept; a service without it always takes `process`.

A service may offer `established(state) -> bool`, its flow's eviction
class in the flow table (`dataplane.core.flowtable`): False while the
responder has not answered (evicted first under a flood of new flows, and
counted against the tenant's cap on half-open flows), True after. Without
it the node counts a flow established once a packet came back from the
responder (a replica: at once, since that is not mirrored).

A service may offer `moved(state) -> state`, called when a packet of a
flow the instance already holds as its own arrives REROUTED: the flow comes
back from another instance that failed (its pin moved here once before and
away again), so the state is older than the stream, as a mirrored one is
just after a takeover. The inspection then recovers as after a takeover.

A service that changes packets (the NAT) offers `rewrite(state, forward,
packet) -> bytes` and `translated(state)`, the tuple its flows carry on the
server side, and is told its place among its service's instances by
`attach(index, count, in_use)` (see `dataplane.core.services.nat`).

A lab topology names services by their registry name (`registry()`): the
built-ins here, and any kind an installed package provides through the
entry point group `affinity_mesh.services` (README, "Services from other
packages"): ``[project.entry-points."affinity_mesh.services"] quota =
"amesh_quota:Quota"`` makes ``kind = "quota"`` work like a built-in.

What `encode_state`/`decode_state` must promise, since the state crosses
the network to another process, possibly of another release:

* deterministic: the same state encodes to the same bytes;
* versioned: the bytes carry a version (or a fixed layout that can never
  change), so a newer layout is refused, not misread;
* validated: `decode_state` raises `ValueError` for anything malformed (a
  wrong length, an unknown version or enum value, an out-of-range field)
  and never another exception; the node counts it (`bad_state`) and keeps
  what it had;
* bounded: at most `MAX_STATE` bytes (the sync record's length field);
* round-trips: ``decode_state(encode_state(s))`` behaves exactly as `s`.

`tests/test_services.py` checks these promises for every registered kind,
plugins included.
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


ENTRY_POINTS = "affinity_mesh.services"
BUILTIN = {"firewall": "dataplane.core.services.firewall:Firewall",
           "inspection": "dataplane.core.services.inspection:Inspection",
           "passthrough": "dataplane.core.services.passthrough:Passthrough",
           "nat": "dataplane.core.services.nat:Nat"}
MAX_STATE = 4096
"""Largest encoded state a service may produce: many flow records share one
sync datagram."""
REQUIRED = ("name", "max_timeout", "process", "encode_state", "decode_state")


class ServiceError(ValueError):
    """A service kind that cannot be used; the message says which and why."""


def registry() -> dict[str, str]:
    """Service kinds by the name a topology uses -> where they come from
    (``module:attribute``): the built-ins, then installed packages' entry
    points. A package cannot replace a built-in kind (its entry point is ignored; `amesh services` lists it as shadowed)."""
    from importlib.metadata import entry_points

    kinds = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINTS):
        kinds.setdefault(ep.name, ep.value)
    return kinds


def load(kind: str) -> type:
    """The class of a service kind; a clear `ServiceError` for an unknown
    kind or a plugin that is broken (does not import, is not a class, lacks
    part of the interface, or names a built-in)."""
    from importlib import import_module
    from importlib.metadata import entry_points

    if kind in BUILTIN:
        module, _, attr = BUILTIN[kind].partition(":")
        return getattr(import_module(module), attr)
    eps = [ep for ep in entry_points(group=ENTRY_POINTS) if ep.name == kind]
    if not eps:
        raise ServiceError(f"unknown service kind {kind!r}; known: {', '.join(sorted(registry()))}")
    ep = eps[0]
    where = f"service kind {kind!r} from entry point {ep.value!r}"
    if ep.dist is not None:
        where += f" of package {ep.dist.name!r}"
    try:
        cls = ep.load()
    except Exception as exc:  # any import-time failure of foreign code: report it, not a traceback
        raise ServiceError(f"{where} does not load: {type(exc).__name__}: {exc}") from None
    if not isinstance(cls, type):
        raise ServiceError(f"{where} is not a class but {type(cls).__name__}")
    missing = [a for a in REQUIRED if not hasattr(cls, a)]
    if missing:
        raise ServiceError(f"{where} lacks {', '.join(missing)} of the Service interface")
    return cls


def create(name: str, **options: Any) -> Service:
    """Instantiate a service kind; unknown kinds, broken plugins and bad
    options are a `ValueError` (or the constructor's `TypeError`) that says
    which."""
    cls = load(name)
    try:
        return cls(**options)
    except (TypeError, ValueError):
        raise
    except Exception as exc:  # foreign code failing in its own way: a clear error, not a traceback
        raise ServiceError(f"service kind {name!r} failed to start: {type(exc).__name__}: {exc}") from None
