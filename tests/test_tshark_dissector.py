"""The Lua dissector shows the same field values as the Scapy layer.

tshark refuses Lua scripts as root, so the capture is read as `nobody`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from layers.craft import CraftSpec, craft
from layers.describe import describe

LUA = Path(__file__).resolve().parents[1] / "layers" / "affinity.lua"
FIELDS = ["version", "flags", "ttl", "length", "next_proto", "chain", "index", "code", "client",
          "epoch"]

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None,
                                reason="tshark not installed (make test installs it)")


def tshark_fields(pcap: Path, lua: Path, proto: str = "affinity",
                  fields: list[str] = FIELDS) -> list[dict[str, int]]:
    cmd = ["tshark", "-X", f"lua_script:{lua}", "-r", str(pcap), "-T", "fields",
           "-E", "separator=,", "-E", "occurrence=f"]
    for name in fields:
        cmd += ["-e", f"{proto}.{name}"]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "nobody", "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return [dict(zip(fields, (int(v, 0) for v in line.split(",")))) for line in out.splitlines()]


@pytest.fixture
def shared_dir():
    """A directory the unprivileged tshark can read."""
    d = Path(tempfile.mkdtemp(prefix="amesh-tshark-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_tshark_sees_what_scapy_sees(shared_dir):
    specs = [
        CraftSpec(chain=70000, index=3, code=0xABCDEF12, client=9, epoch=4000000000,
                  flags=["rerouted"], ttl=12, payload=b"hello"),
        CraftSpec(encap="ether", src="2001:db8::1", dst="2001:db8::2", proto="udp",
                  flags=["oam", "reverse"], client=1, epoch=1),
        CraftSpec(proto="icmp", code=None, chain=1, index=1),
    ]
    pkts = [p for s in specs for p in craft(s)]
    pcap = shared_dir / "x.pcap"
    wrpcap(str(pcap), pkts)
    lua = shared_dir / "affinity.lua"
    shutil.copy(LUA, lua)
    for path in (pcap, lua):
        path.chmod(0o644)
    seen = tshark_fields(pcap, lua)
    assert len(seen) == len(pkts)
    assert len(seen) == len(pkts)
    for pkt, ts in zip(pkts, seen):
        a = describe(Ether(bytes(pkt)))["affinity"]
        expected = {k: a[k] for k in FIELDS if k not in ("flags", "next_proto")}
        expected["flags"] = a["flags_value"]
        expected["next_proto"] = {"IPV4": 1, "IPV6": 2, "ETHERNET": 3}[a["next_proto"]]
        assert ts == expected


def test_tshark_sees_sync_datagrams(shared_dir):
    from scapy.layers.inet import IP, UDP
    from scapy.packet import Raw

    from dataplane.core import syncwire as sw
    from dataplane.core.events import FlowUpdate

    keys = sw.Keyring({2: b"t" * 32}, 2)
    upd = FlowUpdate((1, 5, 6, b"\x0a\x00\x00\x01", 1, b"\x0a\x00\x00\x02", 80), 3, b"st")
    data = sw.encode(keys, sw.node_id("ba"), sw.node_id("bb"), 123456789, 987654321, 77, 1000,
                     [sw.flow_record(upd), sw.Record(sw.RecordType.ACK, sw.u64(5))])
    pkt = Ether() / IP(src="10.99.0.1", dst="10.99.0.2") / UDP(sport=sw.SYNC_PORT, dport=sw.SYNC_PORT) / Raw(data)
    pcap = shared_dir / "sync.pcap"
    wrpcap(str(pcap), [pkt])
    lua = shared_dir / "affinity.lua"
    shutil.copy(LUA, lua)
    for path in (pcap, lua):
        path.chmod(0o644)
    fields = ["version", "key_id", "sender", "receiver", "incarnation", "receiver_incarnation", "counter",
              "seq", "count"]
    seen = tshark_fields(pcap, lua, "affinity_sync", fields)
    s = describe(Ether(bytes(pkt)))["sync"]
    assert seen == [{k: s[k] for k in fields}]
