"""The programs of the forwarding-rate benchmark, each run in its namespace.

``python -m benchmarks.relays MODE --seconds S ...``

* ``send``: blast pre-built encapsulated UDP packets (1000 flows) at the DUT;
* ``sink``: count what arrives, print JSON {packets, rate};
* DUT modes, all receiving on 10.98.0.2:6886 and sending to the sink:
  ``bare`` (recv/sendto, no work: the Python limit with one syscall per
  packet), ``bare-mmsg`` (the same with recvmmsg/sendmmsg batches),
  ``scapy-kept`` (Scapy L2 sockets kept open, raw bytes rewritten),
  ``scapy-naive`` (sniff + sendp, what a newcomer writes), ``instance`` and
  ``instance-mmsg`` (affinity-mesh's ServiceNode with the firewall and async
  sync to a secondary, per-packet or batched syscalls).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

from dataplane.core import header as wire
from dataplane.core.packet import checksum

SRC, DUT_IN, DUT_OUT, SINK = "10.98.0.1", "10.98.0.2", "10.98.1.2", "10.98.1.3"
PORT = wire.UDP_PORT
FLOWS = 1000
CLIENT, SERVER = b"\x0a\x01\x00\x0a", b"\x0a\x02\x00\x0a"


def packets(codes: list[int], epoch: int, new_every: int = 0, count: int = 0) -> list[bytes]:
    """The sender's packets: the first FLOWS codes, one packet per flow in
    turn (every packet after the first round belongs to a known flow); or,
    with `new_every` N, `count` packets in runs of N per flow, each run a
    new flow (one packet in N opens a flow, a change the secondary mirrors).
    The header carries the map's epoch, as an upstream instance's would."""
    if not new_every:
        return [wire.pack(1, 1, code, 1, epoch) + _udp4(CLIENT, SERVER, 20000 + i, 53, b"q" * 18)
                for i, code in enumerate(codes[:FLOWS])]
    out = []
    for f in range(count // new_every):
        head = wire.pack(1, 1, codes[f % len(codes)], 1, epoch)
        inner = _udp4(CLIENT, SERVER, 1024 + f % 60000, 53 + f // 60000, b"q" * 18)
        out.extend([head + inner] * new_every)
    return out


def _udp4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst))
    struct.pack_into("!H", ip, 10, checksum(ip))
    return bytes(ip) + udp


def send(seconds: float, codes: list[int], epoch: int, new_every: int, sources: int = 1) -> None:
    """Blast the packets with sendmmsg, 64 per call: the sender shares the
    machine with the DUT, so it must spend as little CPU per packet as it can.
    With `sources` > 1 the flows are spread over that many sockets (outer UDP
    source ports), as an upstream that picks the source port per flow does,
    so SO_REUSEPORT can spread them over workers and keep each on one."""
    from dataplane.shells.mmsg import BatchSender

    pkts = packets(codes, epoch, new_every, int(seconds * 400_000))
    txs = []
    for _ in range(sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        txs.append(BatchSender(s))
    per = [pkts[k::sources] for k in range(sources)]  # flow i on socket i % sources
    batches = [(txs[k], [(p, (DUT_IN, PORT)) for p in per[k][i:i + 64]])
               for i in range(0, max(len(x) for x in per), 64) for k in range(sources) if per[k][i:i + 64]]
    n, i, end = 0, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        tx, batch = batches[i]
        n += tx.send(batch)
        i = (i + 1) % len(batches)
    print(json.dumps({"sent": n, "rate": n / seconds}), flush=True)


def sink(seconds: float) -> None:
    """Count arrivals with recvmmsg (cheap: the sink shares the machine too)."""
    import select

    from dataplane.shells.mmsg import BatchReceiver

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((SINK, PORT))
    rx = BatchReceiver(s, size=256)
    n, first, last = 0, None, None
    bins: dict[int, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        select.select([s], [], [], 0.2)
        got = len(rx.recv())
        if not got:
            continue
        now = time.monotonic()
        first = first or now
        last = now
        n += got
        b = int(now * 10)
        bins[b] = bins.get(b, 0) + got
    span = (last - first) if first and last and last > first else 1.0
    print(json.dumps({"packets": n, "rate": n / span, "bins": sorted(bins.items())}), flush=True)


def _relay(seconds: float, work, batched: bool, on_tick=None, extra=None,  # type: ignore[no-untyped-def]
           reuseport: bool = False) -> None:
    """Receive on the fabric port, `work(datagrams, now)` -> datagrams for
    the sink, send them; one syscall per packet, or recvmmsg/sendmmsg batches
    (then `work` gets a whole batch)."""
    import selectors

    from dataplane.shells.mmsg import BatchReceiver, BatchSender

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    if reuseport:  # several workers on one port: the kernel spreads flows by 4-tuple hash
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    rx.bind((DUT_IN, PORT))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dst = (SINK, PORT)
    brx, btx = BatchReceiver(rx), BatchSender(tx)
    sel = selectors.DefaultSelector()
    sel.register(rx, selectors.EVENT_READ, None)
    if extra is not None:
        sel.register(extra[0], selectors.EVENT_READ, extra[1])
    end = time.monotonic() + seconds
    last_tick = 0.0
    while (now := time.monotonic()) < end:
        for key, _ in sel.select(0.001):
            if key.data is not None:
                key.data(now)
                continue
            if batched:
                for _ in range(16):
                    got = brx.recv()
                    out = [(d, dst) for d in work([data for data, _src in got], now)]
                    if out:
                        btx.send(out)
                    if len(got) < brx.batch:
                        break
                continue
            for _ in range(64):
                try:
                    data = rx.recv(2048)
                except BlockingIOError:
                    break
                for d in work([data], now):
                    tx.sendto(d, dst)
        if on_tick is not None and now - last_tick >= 0.001:
            last_tick = now
            on_tick(now)


def bare(seconds: float, batched: bool = False) -> None:
    _relay(seconds, lambda datas, now: datas, batched)


def _hold_port() -> socket.socket:
    """Bind the fabric port so the kernel does not answer every packet with
    ICMP port-unreachable while a raw-socket forwarder works."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((DUT_IN, PORT))
    return s


def _macs(iface: str, peer_ip: str) -> tuple[bytes, bytes]:
    """(our MAC on iface, the peer's MAC), priming ARP with one datagram.
    (/sys shows the caller's namespace only after a remount: use ioctl.)"""
    import fcntl

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    mine = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("256s", iface.encode()))[18:24]  # SIOCGIFHWADDR
    s.sendto(b"arp", (peer_ip, 9))
    for _ in range(50):
        for line in open("/proc/net/arp").read().splitlines()[1:]:
            parts = line.split()
            if parts[0] == peer_ip and parts[3] != "00:00:00:00:00:00":
                return mine, bytes.fromhex(parts[3].replace(":", ""))
        time.sleep(0.02)
    raise RuntimeError(f"no ARP entry for {peer_ip}")


def _rewrite(frame: bytes, src_mac: bytes, dst_mac: bytes) -> bytes:
    ip = bytearray(frame[14:])
    ip[12:16], ip[16:20] = socket.inet_aton(DUT_OUT), socket.inet_aton(SINK)
    ip[10:12] = b"\x00\x00"
    struct.pack_into("!H", ip, 10, checksum(ip[:20]))
    ip[26:28] = b"\x00\x00"  # UDP checksum: none
    return dst_mac + src_mac + b"\x08\x00" + bytes(ip)


def scapy_kept(seconds: float) -> None:
    from scapy.arch.linux import L2Socket

    hold = _hold_port()
    src_mac, dst_mac = _macs("d1", SINK)
    rx = L2Socket(iface="d0", filter=f"udp dst port {PORT}")
    rx.ins.settimeout(0.2)
    tx = L2Socket(iface="d1")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            _cls, data, _ts = rx.recv_raw()
        except (socket.timeout, OSError):
            continue
        if data:
            tx.send(_rewrite(data, src_mac, dst_mac))
    hold.close()


def scapy_naive(seconds: float) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.sendrecv import sendp, sniff

    hold = _hold_port()
    _src, dst_mac = _macs("d1", SINK)

    def fwd(p) -> None:  # type: ignore[no-untyped-def]
        ip = p[IP]
        ip.src, ip.dst = DUT_OUT, SINK
        del ip.chksum
        del ip[UDP].chksum
        sendp(Ether(dst=dst_mac.hex(":")) / ip, iface="d1", verbose=0)

    sniff(iface="d0", filter=f"udp dst port {PORT}", prn=fwd, store=False, timeout=seconds)
    hold.close()


def instance(seconds: float, mapfile: str, batched: bool = False, policy: str = "async",
             worker: int | None = None) -> None:
    """The instance; as worker K of several (SO_REUSEPORT on the fabric
    port, its own sync port), when `worker` is given."""
    from dataplane.core import syncwire as sw
    from dataplane.core.events import Send
    from dataplane.core.node import ServiceNode
    from dataplane.core.replicator import Policy, Replicator
    from dataplane.core.servicemap import ServiceMap
    from dataplane.core.services import create
    from dataplane.shells.syncudp import UdpSync

    with open(mapfile) as f:
        m = ServiceMap.from_json(f.read())
    node = ServiceNode("ba", m, create("firewall"))
    rep = Replicator(node, sw.Keyring({1: b"bench-sync-key-0123456789"}, 1), time.time_ns() // 1000,
                     Policy(policy))
    sync = UdpSync(rep, (DUT_OUT, sw.SYNC_PORT + (worker or 0)), {"bb": (SINK, sw.SYNC_PORT)})

    def work(datas: list[bytes], now: float) -> list[bytes]:
        outs = rep.process_batch([node.from_fabric(d, "ingress", now) for d in datas], now)
        return [ev.data for ev in sync.emit(outs) if isinstance(ev, Send)]

    _relay(seconds, work, batched, on_tick=lambda now: sync.emit(rep.tick(now)),
           extra=(sync.sock, lambda now: sync.emit(sync.drain(now))), reuseport=worker is not None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("mode", choices=["send", "sink", "bare", "bare-mmsg", "scapy-kept", "scapy-naive",
                                     "instance", "instance-mmsg"])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--map", default="")
    ap.add_argument("--codes", default="")
    ap.add_argument("--epoch", type=int, default=1)
    ap.add_argument("--new-every", type=int, default=0, help="send: open a new flow every N packets")
    ap.add_argument("--policy", default="async", help="instance: sync policy")
    ap.add_argument("--worker", type=int, default=None, help="instance: worker number (SO_REUSEPORT)")
    ap.add_argument("--sources", type=int, default=1, help="send: outer source ports (sockets)")
    args = ap.parse_args(argv)
    if args.mode == "send":
        send(args.seconds, [int(c) for c in args.codes.split(",")], args.epoch, args.new_every,
             args.sources)
    elif args.mode == "sink":
        sink(args.seconds)
    elif args.mode.startswith("instance"):
        instance(args.seconds, args.map, batched=args.mode.endswith("mmsg"), policy=args.policy,
                 worker=args.worker)
    elif args.mode.startswith("bare"):
        bare(args.seconds, batched=args.mode.endswith("mmsg"))
    else:
        {"scapy-kept": scapy_kept, "scapy-naive": scapy_naive}[args.mode](args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
