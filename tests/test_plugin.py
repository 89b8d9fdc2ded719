"""The pytest plugin (dataplane/testing/plugin.py) as another repository
meets it: loaded from the `pytest11` entry point with no conftest, its
options and fixtures, and the masked comparison failing with a diff."""

from __future__ import annotations

import textwrap

pytest_plugins = ["pytester"]


def test_the_plugin_loads_from_its_entry_point(pytester):
    res = pytester.runpytest_subprocess("--fixtures", "-p", "no:cacheprovider")
    out = res.stdout.str()
    for name in ("amesh_topology", "amesh_lab", "amesh_capture", "amesh_send", "amesh_assert_packets"):
        assert name in out
    assert "dataplane/testing/plugin.py" in out


def test_topology_from_ini_or_command_line(pytester):
    pytester.makeini("[pytest]\namesh_topology = labs/mine.toml\n")
    pytester.makepyfile(textwrap.dedent("""
        def test_path(amesh_topology, request):
            print("TOPOLOGY", amesh_topology.relative_to(request.config.rootpath))
        """))
    assert "TOPOLOGY labs/mine.toml" in pytester.runpytest("-s").stdout.str()
    out = pytester.runpytest("-s", "--amesh-topology", "/etc/other.toml").stdout.str()
    assert "TOPOLOGY" not in out or "other.toml" in out


def test_masked_comparison_passes_on_masked_fields_and_fails_with_a_diff(pytester):
    pytester.makepyfile(textwrap.dedent("""
        from scapy.layers.inet import IP, TCP

        def test_same_but_checksums_masked(amesh_assert_packets):
            a = IP(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(dport=80)))
            b = a.copy()
            b[TCP].chksum = 1
            amesh_assert_packets([a], [b], masks={"TCP": {"chksum"}})

        def test_checksums_count_by_default(amesh_assert_packets):
            a = IP(bytes(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(dport=80)))
            b = a.copy()
            b[TCP].chksum = 1
            amesh_assert_packets([a], [b])

        def test_other_port(amesh_assert_packets):
            amesh_assert_packets([IP(dst="10.0.0.2") / TCP(dport=80)], [IP(dst="10.0.0.2") / TCP(dport=81)])
        """))
    res = pytester.runpytest()
    res.assert_outcomes(passed=1, failed=2)
    assert "TCP.dport: expected http, got 81" in res.stdout.str()
    assert "TCP.chksum: expected" in res.stdout.str()


def test_fabric_masks_touch_only_the_outer_headers():
    """FABRIC masks the kernel-built outer IP and UDP; the inner packet after
    the affinity header is compared whole, its checksums and TTL included."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    from dataplane.testing import FABRIC, diff
    from layers.affinity import Affinity

    def pkt(outer_ttl=64, inner_ttl=64, tcp_sum=None):
        p = Ether() / IP(ttl=outer_ttl) / UDP(sport=1234) / Affinity(chain=1, index=1, code=5) / \
            IP(ttl=inner_ttl, src="10.1.0.10", dst="10.2.0.10") / TCP(dport=80, chksum=tcp_sum)
        return Ether(bytes(p))

    base = pkt()
    assert diff(base, pkt(outer_ttl=9), FABRIC) == []
    assert [d.split(":")[0] for d in diff(base, pkt(inner_ttl=9), FABRIC)] == ["IP.ttl", "IP.chksum"]
    assert [d.split(":")[0] for d in diff(base, pkt(tcp_sum=1), FABRIC)] == ["TCP.chksum"]
