"""What the sans-I/O nodes return: one small dataclass per action.

A node never sends anything itself; its shell (a UDP socket in the lab, a
Python list in the simulation) carries these out.

`Send`, `FlowUpdate` and `Mirror` are built per packet or per mirrored
update, so they are plain slotted dataclasses: a frozen one costs 0.6 us to
construct against 0.18 us (measured). Treat them as immutable all the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from dataplane.core.flowtable import FlowKey


@dataclass(slots=True)
class Send:
    """Send `data` (affinity header + inner packet) to node `to` on the fabric."""

    to: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand the inner packet to the local host side (client or server).
    `options` are the header's options (a GSO option: how the host's
    kernel handed the frame over, for the far edge's host)."""

    data: bytes
    options: bytes = b""


@dataclass(frozen=True, slots=True)
class Drop:
    """The packet was dropped; `reason` is also counted in the node's counters."""

    reason: str


@dataclass(slots=True)
class FlowUpdate:
    """One flow's mirrored state: what the state-sync channel carries.

    `version` only grows per flow; a replica applies an update only when it
    is newer than what it holds. `deleted` mirrors a delete or expiry.
    """

    key: FlowKey
    version: int
    state: bytes = b""
    deleted: bool = False
    fwd_hop: str | None = None
    prev_hop: str | None = None
    timeout: float = 60.0


@dataclass(slots=True)
class Mirror:
    """Mirror `update` to peer `to` (the flow's secondary)."""

    to: str
    update: FlowUpdate


@dataclass(frozen=True, slots=True)
class TookOver:
    """This node served a packet of a flow it held only as a replica: the
    moment a failover completes for that flow."""

    key: FlowKey


@dataclass(frozen=True, slots=True)
class Persist:
    """Keep `data` (the controller's map store: the map it published) so a
    restarted controller resumes from it: the shell replaces its store file
    with it atomically (a torn store would bring the controller back at no
    epoch at all). The controller returns it before the pushes of that map,
    so no forwarder holds an epoch the store has not kept (a controller that
    came back at an older epoch would publish another map under the same
    number, which the forwarders holding the first would never install)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Propose:
    """Write `data`, the next map, to the shared store by
    compare-and-swap against `computed_from`, the store revision of the map
    it was computed from (0: the key must not exist yet), and hand the
    answer to `Controller.on_cas`. A controller of a shared store returns
    this instead of `Persist` and pushes nothing of the map before it wins:
    of several controllers that computed a map from one revision only one
    can publish it, so no two maps ever carry the same epoch."""

    data: bytes
    computed_from: int


Event = Send | Deliver | Drop | Mirror | TookOver
