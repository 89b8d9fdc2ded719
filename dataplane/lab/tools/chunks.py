"""Send text chunks over one TCP connection with pauses between them, from
a fixed local port; print JSON {sent, error}. The pauses let a test break
something between two chunks (a pattern split across a failover)."""

from __future__ import annotations

import argparse
import json
import socket
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dst")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--local-port", type=int, required=True)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("chunks", nargs="+")
    args = ap.parse_args()
    row = {"sent": 0, "error": None}
    try:
        s = socket.socket(socket.AF_INET6 if ":" in args.dst else socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", args.local_port))
        s.settimeout(10)
        s.connect((args.dst, args.port))
        for i, chunk in enumerate(args.chunks):
            if i:
                time.sleep(args.pause)
            s.sendall(chunk.encode())
            row["sent"] += 1
        time.sleep(0.5)
        s.close()
    except OSError as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
