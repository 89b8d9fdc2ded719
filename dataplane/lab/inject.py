"""Send the frames of a pcap from inside a lab node (run in its namespace).

``python -m dataplane.lab.inject --pcap FILE (--iface IF | --udp-to IP)``

* ``--iface IF``: every frame is written as is out of interface IF (an
  AF_PACKET socket), as if the node had sent it;
* ``--udp-to IP``: only the UDP payload of each packet is sent, by a UDP
  socket, to IP and the packet's destination port: the kernel delivers it
  to the node's own fabric socket, the way another forwarder would.

Pacing follows the capture's timestamps unless ``--fast``. Prints one JSON
line: frames sent, skipped (not UDP in --udp-to mode), errors.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from layers.pcap import PcapError, read_frames

ETH_P_ALL = 0x0003


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pcap", required=True)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--iface")
    mode.add_argument("--udp-to")
    ap.add_argument("--fast", action="store_true", help="ignore the capture's pacing")
    args = ap.parse_args(argv)
    sent = skipped = errors = 0
    if args.iface:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((args.iface, 0))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = first = None
    try:
        for frame in read_frames(args.pcap):
            if not args.fast:
                if first is None:
                    start, first = time.monotonic(), frame.time
                else:
                    delay = (frame.time - first) - (time.monotonic() - start)
                    if delay > 0:
                        time.sleep(min(delay, 10.0))
            try:
                if args.iface:
                    sock.send(frame.data)
                else:
                    payload, port = _udp_payload(frame.data)
                    if payload is None:
                        skipped += 1
                        continue
                    sock.sendto(payload, (args.udp_to, port))
                sent += 1
            except OSError:
                errors += 1
    except PcapError as exc:
        print(json.dumps({"error": str(exc), "sent": sent}), flush=True)
        return 1
    print(json.dumps({"sent": sent, "skipped": skipped, "errors": errors}), flush=True)
    return 0


def _udp_payload(frame: bytes) -> tuple[bytes | None, int]:
    """The UDP payload and destination port of an Ethernet/IPv4/UDP frame."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None, 0
    ihl = (frame[14] & 0xF) * 4
    udp = 14 + ihl
    port = int.from_bytes(frame[udp + 2:udp + 4], "big")
    length = int.from_bytes(frame[udp + 4:udp + 6], "big")
    return frame[udp + 8:udp + length], port


if __name__ == "__main__":
    sys.exit(main())
