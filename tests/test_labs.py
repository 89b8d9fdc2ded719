"""Every lab file up, and a download through each of its chains.

Parametrized over labs/*.toml, so a lab file added later is brought up by
this test too. For every tenant, a host of the tenant's prefixes fetches a
file from the server with curl; the file arrives intact, and the flow of
that connection (found by its affinity code) is held, as primary, by
exactly one instance of every service of the tenant's chain and by no
instance of any other service: in the two-tenants lab, tenant 1's
connection crosses A and B, tenant 2's crosses B only.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path

import pytest

from dataplane.lab.session import LabRun, bring_up, tear_down
from dataplane.lab.topology import Topology
from tests.conftest import need_root

LABS = sorted((Path(__file__).resolve().parents[1] / "labs").glob("*.toml"))
FILE = os.urandom(1 << 20)
PORT = 8080


def tenant_host(topo: Topology, tenant: dict) -> str:
    """A host attached to the ingress inside the tenant's prefixes."""
    nets = [ipaddress.ip_network(p) for p in tenant["prefixes"]]
    return next(h.name for h in topo.hosts.values()
                if h.attach == topo.ingress.name and any(h.address.ip in n for n in nets))


def primaries(run: LabRun, code: int) -> dict[str, dict]:
    """Instance -> its primary flow entry for `code`, over every service."""
    return {inst: f for spec in run.topo.services.values() for inst in spec.instances
            for f in run.flows(inst) if f["code"] == f"0x{code:08x}" and f["role"] == "primary"}


@pytest.mark.parametrize("path", LABS, ids=[p.stem for p in LABS])
def test_lab_up_and_every_chain_carries_its_tenants_download(path):
    need_root()
    run = bring_up(path)
    try:
        sha = run.http_server({"f": FILE}, port=PORT)["f"]
        topo = run.topo
        for n, tenant in enumerate(topo.tenants):
            host = tenant_host(topo, tenant)
            sport = 46000 + n
            out = run.tmp / f"got-{host}"
            res = run.run(host, ["curl", "-sS", "-m", "20", "--local-port", str(sport), "-o", str(out),
                                 "-w", "%{http_code}", run.url("f", PORT)], timeout=30)
            assert res.stdout == "200", (host, res.stdout, res.stderr)
            assert hashlib.sha256(out.read_bytes()).hexdigest() == sha
            chain = topo.build_map().chain_for(tenant["id"], PORT)
            assert chain is not None
            code = topo.stream_code(sport, PORT, host=host, client=tenant["id"])
            held = primaries(run, code)
            by_service = {s: [i for i in held if i in topo.services[s].instances] for s in topo.services}
            assert {s for s, insts in by_service.items() if insts} == set(chain.services), \
                (tenant["name"], held.keys())
            assert all(len(insts) <= 1 for insts in by_service.values()), held.keys()
            assert {f["chain"] for f in held.values()} == {chain.id}
        if topo.gso:
            assert sum(run.ask(e, "status")["counters"].get("super_frames", 0)
                       for e in (topo.ingress.name, topo.egress.name)) > 0
    finally:
        tear_down(run)
