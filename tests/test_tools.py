"""The lab's host tools over IPv6 on loopback: the HTTP server binds an
IPv6 address (and "::", which takes IPv4 too), the fetcher follows a
bracketed IPv6 URL, the ping speaks ICMPv6."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataplane.lab.session import TOOLS


def free_port() -> int:
    """A free port on ::1 (skips where the machine has no IPv6 loopback)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            return s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")


@pytest.mark.parametrize("bind,host", [("::1", "[::1]"), ("::", "127.0.0.1"), ("::", "[::1]")])
def test_serve_and_fetch_over_ipv6(tmp_path: Path, bind: str, host: str) -> None:
    body = b"six" * 10_000
    (tmp_path / "f").write_bytes(body)
    port = free_port()
    server = subprocess.Popen([sys.executable, str(TOOLS / "serve.py"), "--bind", bind, "--port", str(port),
                               "--directory", str(tmp_path)], stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("::1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        res = subprocess.run([sys.executable, str(TOOLS / "fetch.py"), f"http://{host}:{port}/f", "-n", "2"],
                             capture_output=True, text=True, timeout=30)
        rows = [json.loads(line) for line in res.stdout.splitlines()]
        assert [(r["error"], r["sha256"]) for r in rows] == [(None, hashlib.sha256(body).hexdigest())] * 2
    finally:
        server.terminate()
        server.wait(timeout=5)


@pytest.mark.parametrize("dst", ["::1", "127.0.0.1"])
def test_ping_both_families_on_loopback(dst: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("raw ICMP sockets need root")
    if ":" in dst:
        free_port()  # skips without IPv6 loopback
    res = subprocess.run([sys.executable, str(TOOLS / "ping.py"), dst, "-c", "2"],
                         capture_output=True, text=True, timeout=30)
    assert json.loads(res.stdout)["received"] == 2, res.stderr
