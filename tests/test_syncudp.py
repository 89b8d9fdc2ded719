"""A real UDP sync channel between two processes on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from dataplane.core import header as wire
from dataplane.core import syncwire as sw
from dataplane.core.liveness import FailureDetector
from dataplane.core.node import INGRESS, ServiceNode
from dataplane.core.replicator import Replicator
from dataplane.core.syncchannel import SyncConfig
from dataplane.core.services import create
from dataplane.shells.syncudp import UdpSync, digest, free_udp_port
from tests.conftest import codes_led_by, pair_map, tcp

KEY = "0123456789abcdef0123456789abcdef"


def test_two_processes_on_loopback(tmp_path):
    m = pair_map()
    (tmp_path / "map.json").write_text(m.to_json())
    pa, pb = free_udp_port(), free_udp_port()
    proc = subprocess.Popen([sys.executable, "-m", "dataplane.shells.syncudp", "--map", str(tmp_path / "map.json"),
                             "--me", "bb", "--listen", f"127.0.0.1:{pb}", "--peer", f"ba=127.0.0.1:{pa}",
                             "--key", KEY, "--idle", "3", "--misses", "50", "--max-seconds", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["ready"]
        node = ServiceNode("ba", m, create("firewall"))
        # a loaded machine stalls either process for a while: what is checked
        # here is what crosses real sockets, not the failure detector
        rep = Replicator(node, sw.Keyring({1: KEY.encode()}, 1), time.time_ns() // 1000,
                         detector=FailureDetector(SyncConfig().heartbeat, 50))
        shell = UdpSync(rep, ("127.0.0.1", pa), {"bb": ("127.0.0.1", pb)})
        codes = codes_led_by(m, "ba", 2000)
        deadline = time.monotonic() + 20
        sent = 0
        while time.monotonic() < deadline:
            now = time.monotonic()
            for c in codes[sent:sent + 100]:
                data = wire.pack(1, 1, c, 1, m.epoch) + tcp(sport=1024 + c % 60000, flags="S")
                shell.emit(rep.process(node.from_fabric(data, INGRESS, now), now))
            sent = min(sent + 100, len(codes))
            shell.emit(shell.drain(now))
            shell.emit(rep.tick(now))
            ch = rep.channels.get("bb")
            if sent == len(codes) and ch is not None and ch.in_sync(now) and not ch._pending:
                break
            time.sleep(0.002)
        assert rep.channels["bb"].in_sync(time.monotonic())
        out, err = proc.communicate(timeout=30)
        result = json.loads(out.strip().splitlines()[-1])
        mine = [node.update_of(e) for e in node.flows if not e.replica]
        assert result["flows"] == len(codes) == len(mine), (result, rep.snapshot(time.monotonic()))
        assert result["digest"] == digest(mine)
        assert result["rejected"] == {"ba": {}}
        shell.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
