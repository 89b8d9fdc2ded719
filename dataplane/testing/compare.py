"""Compare packets with masks, in the spirit of PTF's masked expected packets.

A mask names, per Scapy layer, the fields that may differ (IP id, TTL where
hops decrement it, checksums, an ephemeral UDP source port, MACs of veths
with random addresses). It applies to the outermost layer of that name only:
a packet carried inside another (the inner packet on the fabric) is
compared whole, checksums included. Padding and capture timestamps are
always ignored.
A mismatch raises AssertionError with a readable field-by-field diff of the
first packet that differs.
"""

from __future__ import annotations

from collections.abc import Iterable

from scapy.packet import NoPayload, Packet, Padding

Masks = dict[str, set[str]]

HOST_LINK: Masks = {}
"""Packets that crossed the chain arrive as they were sent: nothing masked,
checksums included (the chain never rewrites an inner packet, and the lab's
host MACs are fixed). Pass masks for a chain that translates (a NAT)."""
FABRIC: Masks = {"Ethernet": {"src", "dst"}, "IP": {"id", "chksum", "flags", "ttl"},
                 "UDP": {"sport", "chksum", "len"}}
"""Outer headers built by the kernel: ids, ports and MACs vary. The inner
packet after the affinity header is compared whole."""


def _layers(pkt: Packet) -> list[Packet]:
    out = []
    layer = pkt
    while layer is not None and not isinstance(layer, (NoPayload, Padding)):
        out.append(layer)
        layer = layer.payload
    return out


def diff(expected: Packet, got: Packet, masks: Masks) -> list[str]:
    """Human-readable differences, empty when the packets match."""
    lines = []
    el, gl = _layers(expected), _layers(got)
    seen: set[str] = set()
    for i, (e, g) in enumerate(zip(el, gl)):
        if type(e) is not type(g):
            lines.append(f"layer {i}: expected {e.name}, got {g.name}")
            break
        masked = masks.get(e.name, set()) if e.name not in seen else set()
        seen.add(e.name)
        for f in e.fields_desc:
            if f.name in masked:
                continue
            ev, gv = e.getfieldval(f.name), g.getfieldval(f.name)
            if ev != gv:
                lines.append(f"{e.name}.{f.name}: expected {f.i2repr(e, ev)}, got {f.i2repr(g, gv)}")
    if len(el) != len(gl):
        lines.append(f"layers: expected {[x.name for x in el]}, got {[x.name for x in gl]}")
    return lines


def assert_packets(expected: Iterable[Packet], got: Iterable[Packet], masks: Masks = HOST_LINK) -> None:
    exp = [type(p)(bytes(p)) for p in expected]
    got_l = [type(p)(bytes(p)) for p in got]
    for n, (e, g) in enumerate(zip(exp, got_l)):
        d = diff(e, g, masks)
        if d:
            raise AssertionError(f"packet {n + 1} differs:\n  " + "\n  ".join(d)
                                 + f"\n  expected: {e.summary()}\n  got:      {g.summary()}")
    if len(exp) != len(got_l):
        extra = got_l[len(exp):] or exp[len(got_l):]
        raise AssertionError(f"expected {len(exp)} packets, got {len(got_l)}; first unmatched: "
                             f"{extra[0].summary()}")
