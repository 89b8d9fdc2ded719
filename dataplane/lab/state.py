"""The lab state file: what `lab up` created, so `down`/`cleanup` remove
exactly that, also after a crash, and never anything found by name pattern.

Every namespace is recorded *before* it is created and every process right
after it starts (with its kernel start time, so a recycled PID is never
signalled). The file lives in ``/run/amesh/<lab>/state.json`` with the
forwarders' logs and control sockets.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_ROOT = Path(os.environ.get("AMESH_RUN_DIR", "/run/amesh"))


def run_dir(lab: str) -> Path:
    return RUN_ROOT / lab


def labs() -> list[str]:
    """Labs that have a state file."""
    if not RUN_ROOT.is_dir():
        return []
    return sorted(p.parent.name for p in RUN_ROOT.glob("*/state.json"))


@dataclass
class Proc:
    pid: int
    start: str
    argv: list[str]


@dataclass
class LabState:
    lab: str
    topology: str
    namespaces: list[str] = field(default_factory=list)
    processes: dict[str, Proc] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return run_dir(self.lab) / "state.json"

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)

    @classmethod
    def load(cls, lab: str) -> LabState | None:
        path = run_dir(lab) / "state.json"
        try:
            doc = json.loads(path.read_text())
            return cls(doc["lab"], doc["topology"], list(doc["namespaces"]),
                       {n: Proc(**p) for n, p in doc["processes"].items()}, doc["created"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: damaged state file ({exc}); remove the lab's namespaces "
                             f"listed in it by hand") from None


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def alive(proc: Proc) -> bool:
    return start_time(proc.pid) == proc.start


def signal_proc(proc: Proc, sig: int) -> bool:
    """Signal the process only if it is still the one we started."""
    if not alive(proc):
        return False
    try:
        os.kill(proc.pid, sig)
        return True
    except ProcessLookupError:
        return False


def stop(proc: Proc, timeout: float = 2.0) -> None:
    """SIGTERM (and SIGCONT, in case it was stopped), then SIGKILL."""
    if not signal_proc(proc, signal.SIGTERM):
        return
    signal_proc(proc, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc):
            _reap(proc.pid)
            return
        time.sleep(0.02)
    signal_proc(proc, signal.SIGKILL)
    _reap(proc.pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
