"""`amesh lab rotate-key`: a new sync or control key on every node of a
running lab, without one datagram refused.

A key has a *purpose*: ``control`` (the controller holds the master key,
every forwarder only its pair key with the controller, computed here so no
forwarder ever sees the master) or ``sync:<service>`` (the HMAC key of that
service's sync channels, held by its members). A rotation of one purpose
runs three phases over the nodes' query sockets, each complete on every node
(every answer ok) before the next starts:

1. **install**: every node accepts the new key id as well as the old one
   and still signs with the old;
2. **switch**: every node signs with the new key (all of them accept it
   already, so nothing is refused);
3. **retire**: after `settle` seconds (datagrams signed before the switch
   still in flight), every node drops every key but the new one; a
   datagram under the old id is then refused (`unknown_key`).

Skipping phase 1 (`unsafe_skip_install`: each node installs and switches
in one step, one node after the other) is the control: a node that signs
with the new key before its peer holds it is refused, and counted.

A node that does not answer, or refuses, stops the rotation with the purpose,
the phase and the node. Every phase is idempotent on a node and the rotation
in progress (purpose, key id, key) stays in the lab's run directory
(``rotation-<purpose>.json``, mode 0600) until its retire phase completed,
so running the command again finishes the same rotation with the same key.
Each forwarder persists its own keys (`node_op`, ``<node>-keys.json``,
0600) so a restarted forwarder comes back with the current keys.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataplane.core import syncwire as sw
from dataplane.lab.query import QueryError
from dataplane.lab.topology import Topology

PHASES = ("install", "switch", "retire")
SETTLE = 0.5
"""Seconds between the switch and the retire phase: a datagram signed with
the old key just before its node switched is still accepted on arrival."""
KEY_LEN = 32

Ask = Callable[[str, dict[str, Any]], dict[str, Any]]
"""Send one query to a node, get its answer (`dataplane.lab.query.ask`);
raise QueryError on no answer."""
Progress = Callable[[str], None]


class RotationError(RuntimeError):
    """A rotation stopped; the message names the purpose, the phase and the
    node, and says that running the command again finishes it."""


def purposes(topo: Topology, service: str | None = None, control: bool = False) -> list[str]:
    """The purposes to rotate: one service's sync key, the control key, or
    (neither given) the control key and every service's sync key."""
    if topo.peers and service is None:
        raise ValueError(f"lab {topo.name} has {len(topo.controllers)} controllers: rotating the control "
                         "key is not supported with peers; rotate a service's sync key (--service)")
    if service is not None:
        if service not in topo.services:
            raise ValueError(f"no service {service!r}; services: {', '.join(topo.services)}")
        return [f"sync:{service}"]
    if control:
        return ["control"]
    return ["control", *(f"sync:{s}" for s in topo.services)]


def nodes_of(topo: Topology, purpose: str) -> list[str]:
    """The nodes holding a key of `purpose`."""
    if purpose == "control":
        return topo.forwarders()
    return list(topo.services[purpose.removeprefix("sync:")].members)


@dataclass
class Rotation:
    """One purpose's rotation to key id `kid`, key `key` (the master key
    for the control purpose)."""

    purpose: str
    kid: int
    key: bytes

    def node_key(self, topo: Topology, node: str) -> bytes:
        """The key `node` gets: a forwarder's pair key with the controller
        for the control purpose, else the key itself."""
        if self.purpose == "control" and node != topo.controller:
            return sw.pair_key(self.key, sw.node_id(topo.controller), sw.node_id(node))
        return self.key

    def request(self, topo: Topology, node: str, op: str) -> dict[str, Any]:
        req: dict[str, Any] = {"cmd": "keys", "op": op, "purpose": self.purpose.split(":")[0],
                               "kid": self.kid}
        if op == "install":
            req["key"] = self.node_key(topo, node).hex()
        return req


def pending_path(run_dir: Path, purpose: str) -> Path:
    return run_dir / f"rotation-{purpose.replace(':', '-')}.json"


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds keys), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def next_kid(held: list[list[int]]) -> int:
    """A key id no node holds: one above the highest held, wrapping within
    1-255."""
    used = {k for ids in held for k in ids}
    kid = max(used, default=0)
    for _ in range(255):
        kid = kid % 255 + 1
        if kid not in used:
            return kid
    raise RotationError("every key id 1-255 is held")


def plan(topo: Topology, purpose: str, ask: Ask, run_dir: Path, key: bytes | None = None) -> Rotation:
    """The rotation of `purpose`: the one in progress (a rerun), else a new
    key id no node holds and `key` or 32 random bytes; recorded in the run
    directory before any node is told."""
    path = pending_path(run_dir, purpose)
    if path.exists():
        doc = json.loads(path.read_text())
        rot = Rotation(purpose, int(doc["kid"]), bytes.fromhex(doc["key"]))
        if key is not None and key != rot.key:
            raise RotationError(f"{purpose}: a rotation to key id {rot.kid} is in progress with "
                                f"another key ({path}); rerun without --key-file to finish it")
        return rot
    held = []
    for node in nodes_of(topo, purpose):
        got = _ask(ask, node, {"cmd": "keys", "op": "show"}, purpose, "plan")
        held.append(got[purpose.split(":")[0]]["ids"])
    if key is not None and len(key) < 16:
        raise RotationError(f"{purpose}: a key must be at least 16 bytes, got {len(key)}")
    rot = Rotation(purpose, next_kid(held), key if key is not None else os.urandom(KEY_LEN))
    write_private(path, json.dumps({"purpose": purpose, "kid": rot.kid, "key": rot.key.hex()}))
    return rot


def _ask(ask: Ask, node: str, req: dict[str, Any], purpose: str, phase: str) -> dict[str, Any]:
    try:
        reply = ask(node, req)
    except QueryError as exc:  # no answer: the node is down, stopped or hung
        raise RotationError(f"{purpose}: phase {phase} stopped at {node}: {exc}") from None
    if "error" in reply:
        raise RotationError(f"{purpose}: phase {phase} stopped at {node}: {reply['error']}")
    return reply


def rotate(topo: Topology, rot: Rotation, ask: Ask, run_dir: Path, progress: Progress = lambda m: None,
           unsafe_skip_install: bool = False, settle: float = SETTLE) -> None:
    """Run the three phases of `rot` on every node of its purpose; raise
    RotationError (purpose, phase, node; rerunnable) when a node fails.
    With `unsafe_skip_install`, each node installs and switches in one step
    (the control: peers not yet holding the key refuse it)."""
    nodes = nodes_of(topo, rot.purpose)
    steps = [("switch", ("install", "switch"))] if unsafe_skip_install else \
        [("install", ("install",)), ("switch", ("switch",))]
    try:
        for phase, ops in steps:
            for node in nodes:
                for op in ops:
                    _ask(ask, node, rot.request(topo, node, op), rot.purpose, phase)
            progress(f"{rot.purpose}: {phase} of key id {rot.kid} done on {len(nodes)} nodes")
        time.sleep(settle)
        for node in nodes:
            _ask(ask, node, rot.request(topo, node, "retire"), rot.purpose, "retire")
    except RotationError as exc:
        raise RotationError(f"{exc}; run the command again to finish this rotation "
                            f"(key id {rot.kid}, kept in {pending_path(run_dir, rot.purpose)})") from None
    pending_path(run_dir, rot.purpose).unlink(missing_ok=True)
    progress(f"{rot.purpose}: retire done: every node holds key id {rot.kid} only")


def node_op(rings: dict[str, sw.Keyring | None], req: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A node's side of a rotation: the answer to one ``keys`` query, and
    whether its keys changed (then it persists them). ``show`` lists the key
    ids (never the keys) of every purpose it holds; ``install``, ``switch``
    and ``retire`` act on one purpose's keyring as described above, each
    idempotent."""
    op = req.get("op")
    if op == "show":
        return {p: {"current": r.current, "ids": sorted(r.keys)} for p, r in rings.items()
                if r is not None}, False
    ring = rings.get(str(req.get("purpose")))
    if ring is None:
        return {"error": f"no {req.get('purpose')!r} keys on this node"}, False
    kid = req.get("kid")
    if type(kid) is not int:
        return {"error": "kid: expected an int"}, False
    try:
        if op == "install":
            ring.add(kid, bytes.fromhex(str(req.get("key", ""))))
        elif op == "switch":
            if kid not in ring.keys:
                return {"error": f"key id {kid} is not installed"}, False
            ring.use(kid)
        elif op == "retire":
            if ring.current != kid:
                return {"error": f"signs with key id {ring.current}, not {kid}: switch first"}, False
            for old in [k for k in ring.keys if k != kid]:
                ring.retire(old)
        else:
            return {"error": f"unknown keys op {op!r}"}, False
    except ValueError as exc:
        return {"error": str(exc)}, False
    return {"ok": True, "current": ring.current, "ids": sorted(ring.keys)}, True
