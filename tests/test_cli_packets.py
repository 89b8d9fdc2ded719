"""`amesh craft` / `decode` / `shell`: round trips and every error path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dataplane.cli.main import main
from layers.craft import CraftSpec, affinity_code


def run(*args: str) -> "CliRunner.invoke":
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_craft_pcap_decode_round_trip(tmp_path):
    pcap = tmp_path / "c.pcap"
    res = run("craft", "-w", str(pcap), "--count", "3", "--chain", "77", "--index", "4",
              "--client", "9", "--epoch", "12", "--flags", "rerouted,reverse", "--code", "0xfeed",
              "--payload", "hi", "--ttl", "20")
    assert res.exit_code == 0, res.output
    res = run("decode", str(pcap), "--json")
    assert res.exit_code == 0
    rows = json.loads(res.stdout)
    assert len(rows) == 3
    for row in rows:
        a = row["affinity"]
        assert (a["chain"], a["index"], a["client"], a["epoch"], a["code"], a["ttl"]) == \
            (77, 4, 9, 12, 0xFEED, 20)
        assert sorted(a["flags"]) == ["rerouted", "reverse"]
        assert row["inner"]["sport"] == 40000 and row["inner"]["dport"] == 80
    text = run("decode", str(pcap)).stdout.splitlines()
    assert len(text) == 3 and "chain=77 si=4 code=0x0000feed client=9 epoch=12" in text[0]


def test_code_auto_is_the_affinity_hash(tmp_path):
    pcap = tmp_path / "a.pcap"
    run("craft", "-w", str(pcap), "--src", "192.0.2.1", "--dst", "198.51.100.2", "--proto", "udp",
        "--sport", "5353", "--dport", "53", "--client", "3")
    row = json.loads(run("decode", str(pcap), "--json").stdout)[0]
    spec = CraftSpec(src="192.0.2.1", dst="198.51.100.2", proto="udp", sport=5353, dport=53, client=3)
    assert row["affinity"]["code"] == affinity_code(spec)
    reverse = CraftSpec(src="198.51.100.2", dst="192.0.2.1", proto="udp", sport=53, dport=5353, client=3)
    assert affinity_code(reverse) == affinity_code(spec)


@pytest.mark.parametrize("encap,proto,src,dst", [
    ("ether", "tcp", "10.0.0.1", "10.0.0.2"),
    ("udp", "icmp", "2001:db8::1", "2001:db8::2"),
    ("ether", "udp", "2001:db8::1", "2001:db8::2"),
])
def test_other_encaps_round_trip(tmp_path, encap, proto, src, dst):
    pcap = tmp_path / "e.pcap"
    assert run("craft", "-w", str(pcap), "--encap", encap, "--proto", proto, "--src", src,
               "--dst", dst).exit_code == 0
    row = json.loads(run("decode", str(pcap), "--json").stdout)[0]
    assert row["affinity"]["next_proto"] == ("IPV6" if ":" in src else "IPV4")
    assert row["inner"]["src"] == src


def test_hexdump_without_w():
    res = run("craft", "--payload-hex", "00ff")
    assert res.exit_code == 0 and "0000  02 00 00 00 00 02" in res.stdout


@pytest.mark.parametrize("args,needle", [
    (["--src", "not-an-ip"], "--src"),
    (["--code", "0x1ffffffff"], "32 bits"),
    (["--chain", "16777216"], "24 bits"),
    (["--flags", "oam,bogus"], "bogus"),
    (["--proto", "gre"], "--proto"),
    (["--sport", "70000"], "--sport"),
    (["--payload-hex", "zz"], "hex"),
    (["--src", "10.0.0.1", "--dst", "2001:db8::1"], "IPv4 or both IPv6"),
])
def test_craft_usage_errors(args, needle):
    res = CliRunner().invoke(main, ["craft", *args])
    assert res.exit_code == 2
    assert needle in res.output
    assert "Traceback" not in res.output


def test_decode_missing_file_is_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["decode", str(tmp_path / "nope.pcap")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_decode_not_a_pcap(tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture at all")
    res = CliRunner().invoke(main, ["decode", str(junk)])
    assert res.exit_code == 1 and "not a readable pcap" in res.output


@pytest.mark.parametrize("cut", [1, 10, 30])
def test_decode_truncated_pcap(tmp_path, cut):
    pcap = tmp_path / "t.pcap"
    run("craft", "-w", str(pcap), "--count", "3", "--payload", "x" * 20)
    pcap.write_bytes(pcap.read_bytes()[:-cut])
    res = CliRunner().invoke(main, ["decode", str(pcap)])
    assert res.exit_code == 1
    assert "truncated record after 2 frames" in res.output
    assert res.stdout.count("chain=") == 2


def test_console_script_exit_codes(tmp_path):
    amesh = [sys.executable, "-m", "dataplane.cli"]
    bad = subprocess.run([*amesh, "craft", "--index", "999"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_shell_preloads_the_layer():
    script = "print('SUMMARY', Affinity(chain=5, code=0xabc).mysummary())\n"
    res = subprocess.run([sys.executable, "-m", "dataplane.cli", "shell"], input=script,
                         capture_output=True, text=True, timeout=60)
    assert "SUMMARY Affinity chain=5" in res.stdout + res.stderr
