"""`amesh top` frames rendered from snapshots recorded on the lab while a B
primary was killed under traffic (tests/data/top-failover-*.jsonl, written
by `amesh top --record` style snapshots: sync on, and the sync-off control)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console

from dataplane.cli.top import digest, frame

DATA = Path(__file__).parent / "data"


def load(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def render(prev, cur) -> str:
    console = Console(record=True, width=160, force_terminal=False)
    console.print(frame(prev, cur))
    return console.export_text()


def row(text: str, node: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(node + " "))
    return line.split()


def failover(snaps: list[dict]) -> tuple[int, str]:
    """Index of the first snapshot in which a node stopped answering, and the node."""
    for i, s in enumerate(snaps):
        dead = [n for n, d in s["digests"].items() if d is None]
        if dead:
            return i, dead[0]
    raise AssertionError("no failover in the recording")


def epoch_of(text: str) -> int:
    return int(re.search(r"map epoch (\d+)", text).group(1))


def test_a_failover_with_sync_as_it_happens():
    snaps = load("top-failover-async.jsonl")
    i, victim = failover(snaps)
    before, during = render(snaps[i - 2], snaps[i - 1]), render(snaps[i - 1], snaps[i])
    assert row(before, victim)[2] == "active"
    assert row(during, victim)[:3] == [victim, "B", "DEAD"]
    assert epoch_of(during) > epoch_of(before)
    new = str(epoch_of(during))
    for node in ("ingress", "egress", "aa", "ab", *(n for n in ("ba", "bc") if n != victim)):
        assert row(during, node)[-2:-1] == [new] or row(during, node)[-1] == new, node
    promoted = [row(during, n) for n in ("ba", "bb", "bc") if n != victim]
    assert any(re.search(r"\(\+\d+\)", " ".join(r)) for r in promoted)
    assert f"epoch {new}: {victim} missed heartbeats" in during
    assert f"declared dead {victim}" in during
    assert "misdelivery" not in during


def test_the_control_without_sync_shows_the_drop_spike_and_no_promotion():
    snaps = load("top-failover-off.jsonl")
    i, victim = failover(snaps)
    during = render(snaps[i - 1], snaps[i])
    survivors = [n for n in ("ba", "bb", "bc") if n != victim]
    assert row(during, victim)[2] == "DEAD"
    spikes = [int(row(during, n)[8].replace(",", "")) for n in survivors]
    assert max(spikes) > 10 and all(row(during, n)[9] == "misdelivery" for n, s in zip(survivors, spikes) if s)
    assert all(row(during, n)[7] == "0" for n in survivors)      # nothing promoted
    quiet = render(snaps[i - 2], snaps[i - 1])
    assert all(row(quiet, n)[8] == "0" for n in ("ba", "bb", "bc"))


def test_rates_come_from_two_snapshots():
    snaps = load("top-failover-async.jsonl")
    a, b = snaps[1], snaps[2]
    text = render(a, b)
    dt = b["time"] - a["time"]
    rate = (b["digests"]["ingress"]["rx"] - a["digests"]["ingress"]["rx"]) / dt
    assert row(text, "ingress")[3] == f"{rate:,.0f}"
    assert row(render(None, b), "ingress")[3] == "-"            # one snapshot: no rate yet


def test_digest_of_a_status_answer():
    status = {"node": "ba", "role": "instance", "epoch": 3, "serving": True,
              "counters": {"promoted": 2, "took_over": 1}, "drops": {"misdelivery": 4},
              "flow_table": {"flows": 10, "replicas": 4},
              "io": {"fabric_rx": [100, 9000], "fabric_tx": [90, 8000]},
              "sync": {"peers": {"bb": {"lag_ms": 3.5, "resend_queue": 2, "in_sync": True},
                                 "bc": {"lag_ms": 1.0, "resend_queue": 1, "in_sync": False}}}}
    d = digest(status)
    assert (d["rx"], d["tx"], d["flows"], d["replicas"], d["promoted"]) == (100, 90, 10, 4, 2)
    assert (d["lag_ms"], d["unacked"], d["in_sync"]) == (3.5, 3, False)
    ctl = digest({"role": "controller", "epoch": 5, "health": {"ba": "alive"}, "states": {"ba": "active"},
                  "events": [{"event": "map", "time": 1.0}, {"event": "epoch", "time": 2.0, "epoch": 5}]})
    assert ctl["events"] == [{"event": "epoch", "time": 2.0, "epoch": 5}]
