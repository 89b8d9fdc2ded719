"""Fetch a URL over N concurrent TCP connections; print one JSON line per
connection: local port, bytes, sha256, error. Runs inside the client namespace."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import threading
import time
from urllib.parse import urlparse


def one(url: str, results: list, i: int, timeout: float, pace: float) -> None:
    u = urlparse(url)
    row = {"i": i, "port": None, "bytes": 0, "sha256": None, "error": None}
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
        conn.connect()
        row["port"] = conn.sock.getsockname()[1]
        conn.request("GET", u.path, headers={"Connection": "close"})
        resp = conn.getresponse()
        h = hashlib.sha256()
        while True:
            chunk = resp.read(65536)
            if not chunk:
                break
            h.update(chunk)
            row["bytes"] += len(chunk)
            if pace:
                time.sleep(pace)
        row["sha256"] = h.hexdigest()
        row["status"] = resp.status
        conn.close()
    except Exception as exc:  # report every failure: it is the test's verdict
        row["error"] = f"{type(exc).__name__}: {exc}"
    results[i] = row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--pace", type=float, default=0.0, help="seconds to sleep per 64 KB read")
    args = ap.parse_args()
    results: list = [None] * args.n
    threads = [threading.Thread(target=one, args=(args.url, results, i, args.timeout, args.pace))
               for i in range(args.n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
