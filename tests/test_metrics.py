"""Prometheus metrics: the collector reads the core's own counters (a
failover shows in them), reasons are the documented values, the README
lists every family, and the loop's HTTP server answers a scrape."""

from __future__ import annotations

import re
import selectors
import socket
import time
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from dataplane.core import syncwire as sw
from dataplane.core.control import Controller
from dataplane.core.liveness import FailureDetector
from dataplane.core.resend import ResendBuffer
from dataplane.core.servicemap import InstanceState
from dataplane.sim.simlink import Faults
from dataplane.shells.metrics import FAMILIES, MetricsServer, generate_latest, registry_for
from tests.test_node import lab_map
from tests.test_replicator import Pair

README = Path(__file__).resolve().parents[1] / "README.md"


def fake_instance(pair: Pair, name: str) -> SimpleNamespace:
    """What the collector reads of a forwarder, around a real core node."""
    rep = pair.reps[name]
    io = {(link, d): [0, 0] for link in ("fabric", "host") for d in ("rx", "tx")}
    io[("fabric", "rx")] = [7, 700]
    return SimpleNamespace(name=name, role="instance", node=rep.node, rep=rep, io=io, serving=True,
                           resend=ResendBuffer(0.05), map=rep.node.map)


def scrape(fwd, clock=time.monotonic) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry_for(fwd, clock)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples, name, **labels) -> float:
    hits = [v for (n, lab), v in samples.items()
            if n == name and all(dict(lab).get(k) == str(w) for k, w in labels.items())]
    assert hits, (name, labels)
    return sum(hits)


def test_a_failover_shows_in_the_secondary_s_counters():
    pair = Pair()
    code = pair.packet("ba", 40000)
    pair.run(0.05)
    secondary = pair.map.secondary("B", code)
    before = scrape(fake_instance(pair, secondary))
    assert value(before, "amesh_flows", role="replica") == 1
    assert value(before, "amesh_flows", role="primary") == 0
    assert value(before, "amesh_sync_records_applied_total") == 1
    assert value(before, "amesh_flows_promoted_total") == 0
    primary_view = scrape(fake_instance(pair, "ba"))
    assert value(primary_view, "amesh_sync_records_sent_total", peer=secondary) >= 1
    assert value(primary_view, "amesh_sync_unacked_records", peer=secondary) == 0
    assert value(primary_view, "amesh_in_sync") == 1
    assert value(primary_view, "amesh_packets_total", link="fabric", direction="rx") == 7
    assert value(primary_view, "amesh_bytes_total", link="fabric", direction="rx") == 700

    new = pair.map.copy()
    new.set_state("ba", InstanceState.DEAD)
    pair.reps[secondary].update_map(new, pair.now)
    after = scrape(fake_instance(pair, secondary))
    assert value(after, "amesh_flows_promoted_total") == 1
    assert value(after, "amesh_flows", role="primary") == 1
    assert value(after, "amesh_map_epoch") == new.epoch > value(before, "amesh_map_epoch")


def test_drops_are_exported_under_documented_reasons_only():
    pair = Pair()
    node = pair.reps["ba"].node
    node.drops["misdelivery"] += 3
    node.drops["some_new_internal_name"] += 2
    got = scrape(fake_instance(pair, "ba"))
    assert value(got, "amesh_drops_total", reason="misdelivery") == 3
    assert value(got, "amesh_drops_total", reason="unclassified") == 2
    assert not [lab for (n, lab) in got if n == "amesh_drops_total" and ("reason", "some_new_internal_name") in lab]


def test_unacked_records_and_their_age_while_the_peer_is_silent():
    pair = Pair()
    pair.run(0.05)                                   # handshakes done
    pair.link.faults = Faults(loss=1.0)
    code = pair.packet("ba", 40001)
    secondary = pair.map.secondary("B", code)
    for _ in range(20):
        pair.step()
    got = scrape(fake_instance(pair, "ba"), lambda: pair.now)
    assert value(got, "amesh_sync_unacked_records", peer=secondary) == 1
    assert 0.015 <= value(got, "amesh_sync_oldest_unacked_age_seconds", peer=secondary) <= 0.025
    assert value(got, "amesh_sync_peer_in_sync", peer=secondary) == 1     # not yet 2 RTOs
    for _ in range(60):
        pair.step()
    got = scrape(fake_instance(pair, "ba"), lambda: pair.now)
    assert value(got, "amesh_sync_records_resent_total", peer=secondary) >= 1
    assert value(got, "amesh_sync_peer_in_sync", peer=secondary) == 0
    assert value(got, "amesh_in_sync") == 0


def test_the_controller_exports_health_state_and_failovers():
    m = lab_map()
    det = FailureDetector(0.005, 4, 1.0)
    ctl = Controller("ctl", m, sw.Keyring({1: b"k" * 32}, 1), 1, det)
    for n in ctl.members:
        det.heard(n, 0.0)
    fwd = SimpleNamespace(name="ctl", role="controller", ctl=ctl, map=None)
    fwd.map = ctl.map
    got = scrape(fwd)
    assert value(got, "amesh_instance_up", member="bb") == 1
    assert value(got, "amesh_failovers_total") == 0
    for n in ctl.members:
        if n != "bb":
            det.heard(n, 0.03)
    ctl.tick(0.031)
    fwd.map = ctl.map
    got = scrape(fwd)
    assert value(got, "amesh_instance_up", member="bb") == 0
    assert value(got, "amesh_instance_state", member="bb", state="dead") == 1
    assert value(got, "amesh_instance_state", member="bb", state="active") == 0
    assert value(got, "amesh_failovers_total") == 1
    assert value(got, "amesh_map_epoch") == ctl.map.epoch == m.epoch + 1


def test_every_family_is_yielded_and_listed_in_the_readme():
    """FAMILIES, what the collectors yield (an instance with a peer and a
    controller), and the README's metric table name the same families."""
    pair = Pair()
    pair.packet("ba", 40000)
    pair.run(0.05)
    ctl = Controller("ctl", lab_map(), sw.Keyring({1: b"k" * 32}, 1), 1, FailureDetector())
    names = {n for n, _ in scrape(fake_instance(pair, "ba"))}
    names |= {n for n, _ in scrape(SimpleNamespace(name="ctl", role="controller", ctl=ctl, map=ctl.map))}
    families = {re.sub(r"_total$", "", n).removeprefix("amesh_") for n in names}
    assert families <= set(FAMILIES)
    assert set(FAMILIES) - families == {"drops", "sync_refused", "control_refused"}  # none yet
    table = set(re.findall(r"^\| `amesh_(\w+?)(?:_total)?` \| (?:counter|gauge) \|", README.read_text(), re.M))
    assert table == set(FAMILIES)
    for name, (kind, _doc, _labels) in FAMILIES.items():
        assert kind in ("counter", "gauge")
        full = f"amesh_{name}_total" if kind == "counter" else f"amesh_{name}"
        assert f"`{full}`" in README.read_text(), full


def test_the_loop_server_answers_a_scrape_and_refuses_other_paths():
    pair = Pair()
    sel = selectors.DefaultSelector()
    srv = MetricsServer(sel, ("127.0.0.1", 0), registry_for(fake_instance(pair, "ba")))
    port = srv.sock.getsockname()[1]

    def get(path: str) -> bytes:
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        c.setblocking(False)
        buf = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for key, _ in sel.select(0.01):
                key.data(key.fileobj, time.monotonic())
            try:
                chunk = c.recv(65536)
                if not chunk:
                    break
                buf += chunk
            except BlockingIOError:
                pass
        c.close()
        return buf

    ok = get("/metrics")
    assert ok.startswith(b"HTTP/1.1 200 OK") and b"amesh_map_epoch{node=\"ba\"}" in ok
    assert get("/nope").startswith(b"HTTP/1.1 404")
    assert srv.scrapes == 1 and srv.clients == {}
    idle = socket.create_connection(("127.0.0.1", port))
    for key, _ in sel.select(0.1):
        key.data(key.fileobj, time.monotonic())
    assert len(srv.clients) == 1
    srv.expire(time.monotonic() + 3)
    assert srv.clients == {}
    idle.close()
