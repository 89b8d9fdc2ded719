"""A real Prometheus server (Debian's) scraping every node of a lab sees a
failover in the counters, through its HTTP API."""

from __future__ import annotations

import hashlib
import time

import pytest
from click.testing import CliRunner

from dataplane.cli.main import main

from dataplane.lab import faults
from dataplane.lab.session import DEFAULT, bring_up, tear_down
from dataplane.lab.topology import PROMETHEUS_NODE
from tests.conftest import need_root

B = ("ba", "bb", "bc")


@pytest.fixture
def observed():
    need_root()
    run = bring_up(DEFAULT, name="obs", prefix="amo", **{"observability.prometheus": True})
    try:
        yield run
    finally:
        tear_down(run)


def scalar(run, expr: str) -> float | None:
    res = run.prometheus(expr)
    return float(res[0]["value"][1]) if res else None


def wait_for(run, expr: str, ok, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = scalar(run, expr)
        if last is not None and ok(last):
            return last
        time.sleep(0.2)
    raise AssertionError(f"{expr} = {last} after {timeout} s")


def test_prometheus_sees_a_failover_in_the_counters(observed):
    run = observed
    assert PROMETHEUS_NODE in run.state.processes and f"amo-{PROMETHEUS_NODE}" in run.state.namespaces
    n_targets = len(run.topo.forwarders())
    wait_for(run, 'count(up{job="amesh"} == 1)', lambda v: v == n_targets)
    sha = run.http_server({"f": bytes(4 << 20)})["f"]
    download = run.spawn("client", ["curl", "-s", "--limit-rate", "1M", "-o", str(run.tmp / "got"),
                                    run.url("f")])
    time.sleep(1.0)
    flows = {i: sum(f["role"] == "primary" for f in run.flows(i)) for i in B}
    victim = max(flows, key=lambda i: flows[i])
    wait_for(run, f'sum(amesh_flows{{service="B",role="replica",node!="{victim}"}})', lambda v: v >= 1)
    epoch = wait_for(run, 'amesh_map_epoch{node="ctl"}', lambda v: v >= 1)
    promoted = scalar(run, 'sum(amesh_flows_promoted_total{service="B"})')
    assert scalar(run, f'amesh_instance_up{{member="{victim}"}}') == 1
    assert scalar(run, "amesh_failovers_total") == 0
    assert promoted == 0

    faults.kill(run.state, victim)
    wait_for(run, f'amesh_instance_up{{member="{victim}"}}', lambda v: v == 0)
    wait_for(run, 'amesh_map_epoch{node="ctl"}', lambda v: v > epoch)
    wait_for(run, "amesh_failovers_total", lambda v: v == 1)
    wait_for(run, f'amesh_instance_state{{member="{victim}",state="dead"}}', lambda v: v == 1)
    wait_for(run, 'sum(amesh_flows_promoted_total{service="B"})', lambda v: v > promoted)
    wait_for(run, 'sum(amesh_flows_taken_over_total{service="B"})', lambda v: v >= 1)
    wait_for(run, f'up{{job="amesh",instance="{run.topo.fabric_ip(victim)}:9469"}}', lambda v: v == 0)
    assert scalar(run, 'sum(amesh_flows_lost_total)') == 0
    assert download.wait(timeout=60) == 0
    assert hashlib.sha256((run.tmp / "got").read_bytes()).hexdigest() == sha
    res = CliRunner().invoke(main, ["lab", "promql", "--lab", run.name, "amesh_failovers_total"])
    assert res.exit_code == 0 and 'node="ctl"' in res.output and res.output.strip().endswith(" 1")
