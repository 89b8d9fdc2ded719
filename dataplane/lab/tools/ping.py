"""Minimal ICMP echo (ping) with a raw socket: the namespaces have no ping
binary. Prints JSON {sent, received, rtt_ms}. Runs inside a namespace.
An IPv6 destination is pinged with ICMPv6 (the kernel fills in its
checksum, and a raw ICMPv6 socket receives no IP header)."""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import time

from dataplane.core.packet import checksum


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dst")
    ap.add_argument("-c", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1.0)
    args = ap.parse_args()
    v6 = ":" in args.dst
    s = (socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) if v6
         else socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    request, reply = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    rtts = []
    for seq in range(args.c):
        body = struct.pack("!d", time.monotonic()) + b"affinity-mesh"
        hdr = struct.pack("!BBHHH", request, 0, 0, ident, seq)
        pkt = struct.pack("!BBHHH", request, 0, 0 if v6 else checksum(hdr + body), ident, seq) + body
        s.sendto(pkt, (args.dst, 0))
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            data = s.recv(2048)
            ihl = 0 if v6 else (data[0] & 0xF) * 4
            if len(data) < ihl + 16:
                continue
            typ, _code, _ck, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
            if typ == reply and rid == ident and rseq == seq:
                rtts.append((time.monotonic() - struct.unpack_from("!d", data, ihl + 8)[0]) * 1000)
                break
    print(json.dumps({"sent": args.c, "received": len(rtts), "rtt_ms": [round(r, 3) for r in rtts]}))


if __name__ == "__main__":
    main()
