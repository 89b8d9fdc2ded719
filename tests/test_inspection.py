"""Inspection: app id, cross-packet patterns, and partial-match state that survives a move."""

from __future__ import annotations

import pytest

from dataplane.core.packet import parse
from dataplane.core.services import Action
from dataplane.core.services.inspection import FlowAction, Inspection
from tests.conftest import tcp

RULES = [{"name": "exfil", "pattern": "SECRET-TOKEN"}]


def send(svc, st, payload, forward=True):
    return svc.process(parse(tcp(flags="PA", payload=payload)), forward, st, 0.0)


def test_app_detection():
    svc = Inspection()
    v, st = send(svc, None, b"GET / HTTP/1.1\r\n")
    assert st.app == "http" and st.action == FlowAction.ALLOW and v.mirror
    _, st = send(Inspection(), None, b"\x16\x03\x01\x02\x00")
    assert st.app == "tls"
    svc = Inspection(rules=RULES)
    st = None
    for _ in range(3):
        _, st = send(svc, st, b"zzz")
    assert st.app == "unknown" and st.action == FlowAction.INSPECT


def test_pattern_split_across_packets_blocks():
    svc = Inspection(rules=RULES)
    v, st = send(svc, None, b"...SECRET-")
    assert v.action == Action.FORWARD and v.mirror
    v, st = send(svc, st, b"TOKEN...")
    assert v.action == Action.DROP and v.reason == "blocked" and st.matched == "exfil"
    v, st = send(svc, st, b"harmless")
    assert v.reason == "blocked"


def test_directions_are_separate_streams():
    svc = Inspection(rules=RULES)
    _, st = send(svc, None, b"SECRET-")
    v, st = send(svc, st, b"TOKEN", forward=False)
    assert v.action == Action.FORWARD


@pytest.mark.parametrize("mirrored", [True, False])
def test_partial_match_state_survives_a_move(mirrored):
    """First half on one instance, second half on another: caught only if the
    first instance's state was carried over (the failover case)."""
    first, second = Inspection(rules=RULES), Inspection(rules=RULES)
    _, st = send(first, None, b"header SECRET-")
    carried = second.decode_state(first.encode_state(st)) if mirrored else None
    v, _ = send(second, carried, b"TOKEN trailer")
    assert (v.reason == "blocked") is mirrored


def test_limit_turns_to_allow_and_state_round_trips():
    svc = Inspection(rules=RULES, inspect_limit=100)
    _, st = send(svc, None, b"a" * 150)
    assert st.action == FlowAction.ALLOW and st.tails == [b"", b""]
    assert svc.decode_state(svc.encode_state(st)) == st
    with pytest.raises(ValueError):
        svc.decode_state(b"\x00" * 5)
    with pytest.raises(ValueError):
        Inspection(rules=[{"name": "x", "pattern": ""}])
