"""Minimal ICMP echo (ping) with a raw socket: the namespaces have no ping
binary. Prints JSON {sent, received, rtt_ms}. Runs inside a namespace."""

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
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts = []
    for seq in range(args.c):
        body = struct.pack("!d", time.monotonic()) + b"affinity-mesh"
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr + body), ident, seq) + body
        s.sendto(pkt, (args.dst, 0))
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            data = s.recv(2048)
            ihl = (data[0] & 0xF) * 4
            typ, _code, _ck, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
            if typ == 0 and rid == ident and rseq == seq:
                rtts.append((time.monotonic() - struct.unpack_from("!d", data, ihl + 8)[0]) * 1000)
                break
    print(json.dumps({"sent": args.c, "received": len(rtts), "rtt_ms": [round(r, 3) for r in rtts]}))


if __name__ == "__main__":
    main()
