"""Ask a running forwarder a question over its Unix socket (one JSON line each way).

The socket lives in the lab's run directory, which every namespace shares,
so the CLI reaches a node without entering its namespace.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from dataplane.lab.state import run_dir


class QueryError(RuntimeError):
    """The node did not answer (not running, stopped, or hung)."""


def ask(lab: str, node: str, request: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    path = run_dir(lab) / f"{node}.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall((json.dumps(request) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
    except (OSError, socket.timeout) as exc:
        raise QueryError(f"{node} did not answer ({exc})") from None
    try:
        return json.loads(buf)
    except ValueError:
        raise QueryError(f"{node} sent a garbled answer") from None


def ask_controller(lab: str, controllers: list[str], request: dict[str, Any],
                   timeout: float = 2.0) -> dict[str, Any]:
    """`request` to the first of `controllers` (`Topology.controllers`) that
    answers: with peers, any controller holds the map, and one may be down."""
    errors = []
    for c in controllers:
        try:
            return ask(lab, c, request, timeout)
        except QueryError as exc:
            errors.append(str(exc))
    raise QueryError("; ".join(errors))
