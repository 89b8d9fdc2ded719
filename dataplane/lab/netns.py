"""Run things inside a named network namespace without `ip netns exec`.

A child process enters the namespace with setns(2) between fork and exec
(`spawn`/`run`), so programs start *inside* it: Scapy, which caches
interfaces at import, and the forwarders see only the lab's interfaces.
`/run/netns/NAME` is where pyroute2 and iproute2 keep namespace handles.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def enter(name: str) -> None:
    """Move the calling process into namespace `name` (it must exist)."""
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        _setns(fd, name)
    finally:
        os.close(fd)


def _setns(fd: int, name: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({name}): {os.strerror(err)}")


def socket_in(name: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket made inside namespace `name`, for this process to use from
    where it is: a socket stays in the namespace it was made in, so one
    process can send from several namespaces without a child per namespace.
    The calling thread enters `name` for the call only."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        enter(name)
        try:
            return socket.socket(family, kind, proto)
        finally:
            _setns(own, "own namespace")
    finally:
        os.close(own)


def spawn(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start `argv` inside namespace `name` (the parent stays where it is)."""
    if not exists(name):
        raise FileNotFoundError(f"no network namespace {name!r}")
    return subprocess.Popen(list(argv), preexec_fn=lambda: enter(name), **kwargs)


def run(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run `argv` to completion inside namespace `name`."""
    if not exists(name):
        raise FileNotFoundError(f"no network namespace {name!r}")
    return subprocess.run(list(argv), preexec_fn=lambda: enter(name), **kwargs)


def processes_in(name: str) -> list[int]:
    """PIDs of every process inside namespace `name`, found by identity, not
    by name: a process is inside when its /proc/PID/ns/net is the same
    namespace (device and inode) as /run/netns/NAME. This process is left out."""
    try:
        st = os.stat(os.path.join(NETNS_DIR, name))
    except FileNotFoundError:
        return []
    target, me = (st.st_dev, st.st_ino), os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            ns = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone meanwhile, or a kernel thread we may not read
            continue
        if (ns.st_dev, ns.st_ino) == target:
            out.append(int(entry))
    return sorted(out)


def end_processes(name: str, grace: float = 1.0) -> int:
    """End every process inside namespace `name`: SIGTERM, then SIGKILL for
    those still there after `grace` seconds. Returns how many there were."""
    pids = processes_in(name)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = pids
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in processes_in(name) if p in pids]
    for pid in left:
        _signal(pid, signal.SIGKILL)
    return len(pids)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def sysctl(name: str, key: str, value: str) -> None:
    """Write a net sysctl inside namespace `name` (/proc/sys is per namespace)."""
    path = "/proc/sys/" + key.replace(".", "/")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            enter(name)
            with open(path, "w") as f:
                f.write(value)
        except BaseException:  # never let the child run the parent's code on
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"sysctl {key}={value} failed in {name}")
