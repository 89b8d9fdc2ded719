"""The affinity-mesh pytest plugin: a lab, captures, packet injection and
masked comparison as fixtures, for test suites in any repository.

Installed with the package (entry point ``pytest11: affinity_mesh``), so a
suite needs no conftest. Every name starts with ``amesh_`` so none collides
with another plugin's:

``amesh_topology`` (module)
    Path of the topology file. From ``--amesh-topology PATH`` or the ini
    option ``amesh_topology`` (relative to the rootdir), else the package's
    ``labs/default.toml``; override the fixture to choose per module.
``amesh_lab`` (module)
    That lab, up (`dataplane.lab.session.LabRun`: ``.topo``, ``.run``,
    ``.tool``, ``.http_server``, ``.ask``, ``.map()``, ...), torn down after
    the module, also on failure. Skips the test when not root (network
    namespaces need it).
``amesh_capture`` (function)
    ``amesh_capture(node, iface, bpf="")`` starts tcpdump in the node's
    namespace; ``.stop()`` returns the Scapy packets. The pcaps of a failed
    test stay in ``<rootdir>/<amesh_artifacts>/<test>/`` (ini option,
    default ``amesh-artifacts``) to open in Wireshark with
    ``layers/affinity.lua``; a passing test's are removed.
``amesh_send`` (function)
    ``amesh_send(node, packets_or_pcap, iface=None, fast=True)``: packets
    into the lab from inside a node (`dataplane.lab.packets.send`): a host
    sends them out of eth0 (bare IP packets get its MACs), a forwarder
    receives encapsulated packets on its fabric socket.
``amesh_assert_packets`` (function)
    ``amesh_assert_packets(expected, got, masks=HOST_LINK)``: masked
    comparison with a field-by-field diff (`dataplane.testing.compare`;
    also importable as ``from dataplane.testing import assert_packets``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dataplane.testing.compare import HOST_LINK, assert_packets

_REPORT = pytest.StashKey[pytest.TestReport]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("affinity-mesh")
    group.addoption("--amesh-topology", default=None, help="topology file of the amesh_lab fixture")
    parser.addini("amesh_topology", "topology file of the amesh_lab fixture (relative to the rootdir)",
                  default="")
    parser.addini("amesh_artifacts", "where captures of failed tests are kept (relative to the rootdir)",
                  default="amesh-artifacts")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.stash[_REPORT] = rep


def need_root() -> None:
    """Skip the calling test unless it runs as root."""
    if os.geteuid() != 0:
        pytest.skip("namespace labs need root (CI runs as root)")


@pytest.fixture(scope="module")
def amesh_topology(request: pytest.FixtureRequest) -> Path:
    cfg = request.config
    given = cfg.getoption("--amesh-topology") or cfg.getini("amesh_topology")
    if not given:
        from dataplane.lab.topology import DEFAULT_LAB
        return DEFAULT_LAB
    path = Path(given)
    return path if path.is_absolute() else Path(cfg.rootpath) / path


@pytest.fixture(scope="module")
def amesh_lab(amesh_topology: Path) -> Iterator[Any]:
    from dataplane.lab.session import bring_up, tear_down

    need_root()
    run = bring_up(amesh_topology)
    try:
        yield run
    finally:
        tear_down(run)


@pytest.fixture
def amesh_capture(request: pytest.FixtureRequest, amesh_lab: Any) -> Iterator[Callable[..., Any]]:
    from dataplane.lab.packets import Capture

    root = Path(request.config.rootpath) / request.config.getini("amesh_artifacts")
    base = root / re.sub(r"[^\w.-]", "_", request.node.name)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    caps: list[Capture] = []

    def start(node: str, iface: str, bpf: str = "") -> Capture:
        cap = Capture(amesh_lab.topo, node, iface, base / f"{node}-{iface}.pcap", bpf)
        caps.append(cap)
        return cap

    yield start
    for cap in caps:
        cap.stop()
    rep = request.node.stash.get(_REPORT, None)
    if rep is None or not rep.failed:
        shutil.rmtree(base, ignore_errors=True)
        if root.exists() and not any(root.iterdir()):
            root.rmdir()


@pytest.fixture
def amesh_send(amesh_lab: Any) -> Callable[..., dict[str, int]]:
    from dataplane.lab.packets import send

    def into(node: str, packets: Any, iface: str | None = None, fast: bool = True) -> dict[str, int]:
        return send(amesh_lab.topo, node, packets, iface=iface, fast=fast)

    return into


@pytest.fixture
def amesh_assert_packets() -> Callable[..., None]:
    def check(expected: Any, got: Any, masks: Any = HOST_LINK) -> None:
        assert_packets(expected, got, masks)

    return check
