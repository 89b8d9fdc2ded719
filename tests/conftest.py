"""Shared helpers: inner packets crafted with Scapy, parsed by the dataplane."""

from __future__ import annotations

import inspect

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from dataplane.core.node import EGRESS, INGRESS
from dataplane.core.packet import Inner, parse
from dataplane.core.servicemap import Chain, ServiceMap, Tenant
from dataplane.testing.plugin import need_root

__all__ = ["need_root"]


LAB_FIXTURES = {"lab", "fresh", "amesh_lab", "capture", "amesh_capture", "recorded"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that bring up a namespace lab `lab` (by fixture, or by
    calling `bring_up` themselves), so `pytest -m "not lab"` runs the rest
    in seconds and without root."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        fns = [getattr(item, "function", None)] + [
            d.func for defs in (info.name2fixturedefs.values() if info else ()) for d in defs]
        direct = any(fn is not None and "bring_up(" in inspect.getsource(fn) for fn in fns)
        if direct or LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


def tcp(src: str = "10.1.0.10", dst: str = "10.2.0.10", sport: int = 40000, dport: int = 80,
        flags: str = "S", seq: int = 1000, ack: int = 0, payload: bytes = b"") -> bytes:
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                            ack=ack) / Raw(payload))


def udp(src: str = "10.1.0.10", dst: str = "10.2.0.10", sport: int = 5000, dport: int = 53,
        payload: bytes = b"q") -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload))


def inner(data: bytes) -> Inner:
    return parse(data)


@pytest.fixture
def mk():
    """Packet builders for tests: mk.tcp(...), mk.udp(...), mk.inner(bytes)."""
    class Builders:
        pass
    b = Builders()
    b.tcp, b.udp, b.inner = tcp, udp, inner
    return b


def pair_map(buckets: int = 1024) -> ServiceMap:
    """ingress -> B (ba, bb) -> egress for tenant 1 on 10.1.0.0/16."""
    m = ServiceMap(buckets=buckets)
    m.add_service(INGRESS, [INGRESS])
    m.add_service("B", ["ba", "bb"])
    m.add_service(EGRESS, [EGRESS])
    m.add_tenant(Tenant(1, "t", ["10.1.0.0/16"]))
    m.add_chain(Chain(1, 1, ["B"]))
    return m


def codes_led_by(m: ServiceMap, name: str, n: int = 1, service: str = "B") -> list[int]:
    """The first `n` affinity codes whose primary in `service` is `name`."""
    out: list[int] = []
    code = 0
    while len(out) < n:
        if m.primary(service, code) == name:
            out.append(code)
        code += 1
    return out


@pytest.fixture(scope="module")
def lab(amesh_lab):
    """The default lab for the module's tests: the plugin's `amesh_lab`
    (dataplane/testing/plugin.py) under the short name these tests use."""
    return amesh_lab


@pytest.fixture
def capture(amesh_capture):
    """The plugin's `amesh_capture` under the short name these tests use."""
    return amesh_capture
