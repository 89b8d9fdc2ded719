"""Claim 1 end to end in one process, and its control."""

from __future__ import annotations

from dataplane.sim.simulation import run_claim1


def test_stream_survives_primary_death_with_sync():
    r = run_claim1(sync=True)
    assert r.survived, r
    assert r.rerouted_seen
    assert r.fabric.get("sent_to_dead", 0) == 0
    assert not r.drops
    assert any("bb serves the stream" in what for _, what in r.timeline)


def test_control_without_sync_breaks_as_misdelivery():
    r = run_claim1(sync=False)
    assert not r.survived
    assert r.server_bytes == 8 * 1000          # exactly what crossed ba before it died
    assert r.drops["bb"]["misdelivery"] > 0


def test_failure_point_does_not_matter():
    for fail_after in (1, 5, 19):
        assert run_claim1(sync=True, fail_after=fail_after).survived
