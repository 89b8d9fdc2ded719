"""Turn a captured frame into the affinity header's fields, for people and JSON.

`amesh decode` prints these; tests compare them with tshark's view of the
same capture, so this is the one place that says what "the fields" are.
"""

from __future__ import annotations

from typing import Any

from scapy.config import conf
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from layers.affinity import FLAG_BITS, Affinity
from layers.sync import RECORD_TYPES, AffinitySync

HEADER_FIELDS = ("version", "flags", "ttl", "length", "next_proto", "chain", "index",
                 "code", "client", "epoch")


SYNC_FIELDS = ("version", "key_id", "sender", "receiver", "incarnation", "receiver_incarnation",
               "counter", "seq", "count")


def dissect(data: bytes, linktype: int) -> Packet:
    """Dissect a frame with the class Scapy uses for its link type."""
    cls = conf.l2types.get(linktype, Raw)
    return cls(data)


def describe(pkt: Packet) -> dict[str, Any]:
    """The outer addressing, the affinity header (or None) and the inner flow."""
    out: dict[str, Any] = {"outer": _endpoints(pkt), "affinity": None, "inner": None}
    sync = pkt.getlayer(AffinitySync)
    if sync is not None:
        out["sync"] = {name: sync.getfieldval(name) for name in SYNC_FIELDS}
        out["sync"]["records"] = [RECORD_TYPES.get(r.type, str(r.type)) for r in sync.records]
        return out
    hdr = pkt.getlayer(Affinity)
    if hdr is None:
        out["inner"] = out["outer"]
        out["outer"] = None
        return out
    fields = {name: hdr.getfieldval(name) for name in HEADER_FIELDS}
    fields["flags"] = [n for i, n in enumerate(FLAG_BITS) if int(hdr.flags) & (1 << i)]
    fields["next_proto"] = hdr.get_field("next_proto").i2repr(hdr, hdr.next_proto)
    fields["flags_value"] = int(hdr.flags)
    fields["options"] = bytes(hdr.options).hex()
    out["affinity"] = fields
    out["inner"] = _endpoints(hdr.payload) if hdr.payload else None
    return out


def _endpoints(pkt: Packet) -> dict[str, Any] | None:
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    if ip is None:
        eth = pkt.getlayer(Ether)
        return {"l2": f"{eth.src} > {eth.dst}", "type": hex(eth.type)} if eth else None
    out: dict[str, Any] = {"src": ip.src, "dst": ip.dst,
                           "proto": ip.proto if isinstance(ip, IP) else ip.nh}
    l4 = ip.payload
    if isinstance(l4, (TCP, UDP)):
        out["sport"], out["dport"] = l4.sport, l4.dport
        out["l4"] = "tcp" if isinstance(l4, TCP) else "udp"
        if isinstance(l4, TCP):
            out["tcp_flags"] = str(l4.flags)
    elif isinstance(l4, ICMP):
        out["l4"] = "icmp"
        out["icmp_type"] = l4.type
    return out


def one_line(n: int, d: dict[str, Any]) -> str:
    """A line of `amesh decode`'s text output."""
    parts = [f"{n:>4}"]
    if d["outer"]:
        parts.append(_fmt_ep(d["outer"]))
    a = d["affinity"]
    if d.get("sync"):
        s = d["sync"]
        parts.append(f"| sync key={s['key_id']} {s['sender']:08x}>{s['receiver']:08x} "
                     f"inc={s['incarnation']}>{s['receiver_incarnation']} ctr={s['counter']} seq={s['seq']} "
                     f"[{','.join(s['records'])}] |")
    elif a is None:
        parts.append("(no affinity header)")
    else:
        flags = "+".join(a["flags"]) or "-"
        parts.append(f"| v{a['version']} flags={flags} ttl={a['ttl']} len={a['length']} "
                     f"nxt={a['next_proto']} chain={a['chain']} si={a['index']} "
                     f"code=0x{a['code']:08x} client={a['client']} epoch={a['epoch']} |")
    if d["inner"]:
        parts.append(_fmt_ep(d["inner"]))
    return " ".join(parts)


def _fmt_ep(ep: dict[str, Any]) -> str:
    if "l2" in ep:
        return f"{ep['l2']} type={ep['type']}"
    if "sport" in ep:
        extra = f" {ep['tcp_flags']}" if "tcp_flags" in ep else ""
        return f"{ep['l4']} {ep['src']}:{ep['sport']} > {ep['dst']}:{ep['dport']}{extra}"
    return f"ip/{ep['proto']} {ep['src']} > {ep['dst']}"
