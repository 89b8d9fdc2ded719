"""A TCP sink for lab hosts: accepts connections and appends one JSON line
per chunk received (peer port, the chunk as text) to --out, as it arrives,
and a last line per connection (bytes, sha256) when the peer closes. Used to
see exactly what crossed the chain, even on a connection that never ends."""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import threading


def serve(conn: socket.socket, out: str, lock: threading.Lock) -> None:
    data = bytearray()
    with conn:
        port = conn.getpeername()[1]
        conn.settimeout(30)
        try:
            while chunk := conn.recv(65536):
                data += chunk
                _write(out, lock, {"port": port, "data": chunk.decode(errors="replace")})
        except OSError:
            pass
    _write(out, lock, {"port": port, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                       "closed": True})


def _write(out: str, lock: threading.Lock, row: dict) -> None:
    with lock, open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lock = threading.Lock()
    s = socket.socket(socket.AF_INET6 if ":" in args.bind else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args.bind, args.port))
    s.listen(128)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn, args.out, lock), daemon=True).start()


if __name__ == "__main__":
    main()
