"""Processes do not outlive the lab (lab test: run under the lab lock).

`amesh lab exec` passes SIGINT/SIGTERM/SIGHUP on to its command and exits
with its status; `down` ends every process still inside the lab's
namespaces, found through /proc/PID/ns/net, not by name, and says how many.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import netns as pr_netns

from dataplane.lab import netns
from tests.conftest import need_root

ROOT = Path(__file__).resolve().parents[1]
AMESH = [sys.executable, "-m", "dataplane.cli.main"]
TOPOLOGY = (ROOT / "examples/lab-tests/topology.toml").read_text() \
    .replace('name = "example"', 'name = "sweep"').replace('prefix = "amx"', 'prefix = "amw"') \
    .replace('subnet = "10.96.0.0/24"', 'subnet = "10.91.0.0/24"')


def inside(ident: tuple[int, int]) -> list[int]:
    """PIDs whose network namespace is `ident` (device, inode), even after
    the namespace lost its name."""
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = os.stat(f"/proc/{e}/ns/net")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == ident:
                out.append(int(e))
    return out


def test_the_finder_sees_a_process_in_a_namespace_of_its_own():
    """The control: a process started in a namespace stays there until
    something ends it; the finder sees exactly it, and ends it."""
    need_root()
    name = f"amesh-sweep-{os.getpid()}"
    pr_netns.create(name)
    try:
        proc = netns.spawn(name, ["sleep", "60"])
        time.sleep(0.1)
        assert netns.processes_in(name) == [proc.pid]
        assert netns.end_processes(name) == 1
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert netns.processes_in(name) == []
    finally:
        pr_netns.remove(name)


@pytest.mark.lab
def test_lab_exec_forwards_signals_and_down_ends_what_is_left(tmp_path):
    need_root()
    topo = tmp_path / "sweep.toml"
    topo.write_text(TOPOLOGY)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([*AMESH, "lab", "up", str(topo)], check=True, cwd=ROOT, env=env, capture_output=True)
    try:
        ns = {n: f"amw-{n}" for n in ("client", "server")}
        ident = {n: (os.stat(f"/run/netns/{v}").st_dev, os.stat(f"/run/netns/{v}").st_ino) for n, v in ns.items()}
        # a foreground command stopped through its `lab exec` parent
        fg = subprocess.Popen([*AMESH, "lab", "exec", "--lab", "sweep", "client", "--", "sleep", "300"],
                              cwd=ROOT, env=env)
        # a background server left running
        bg = subprocess.Popen([*AMESH, "lab", "exec", "--lab", "sweep", "server", "--",
                               sys.executable, "-c", "import time; time.sleep(300)"], cwd=ROOT, env=env,
                              start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (inside(ident["client"]) and inside(ident["server"])):
            time.sleep(0.1)
        assert inside(ident["client"]) and inside(ident["server"])
        fg.send_signal(signal.SIGTERM)
        assert fg.wait(timeout=10) == 128 + signal.SIGTERM
        time.sleep(0.2)
        assert inside(ident["client"]) == []           # the sleep went with it
        assert inside(ident["server"])                  # the server is still running
    finally:
        down = subprocess.run([*AMESH, "lab", "down", "--lab", "sweep"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
    assert "1 process still in namespace amw-server" in down.stdout + down.stderr, down.stdout + down.stderr
    assert inside(ident["server"]) == [] and inside(ident["client"]) == []
    assert bg.wait(timeout=10) == 128 + signal.SIGTERM
