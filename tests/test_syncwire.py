"""Flow records on the sync wire: every shape round-trips, damage is refused."""

from __future__ import annotations

import pytest

from dataplane.core import syncwire as sw
from dataplane.core.events import FlowUpdate

V4 = (1, 12345, 17, b"\x0a\x01\x00\x0a", 20000, b"\x0a\x02\x00\x0a", 53)
V6 = (1, 5, 6, bytes(16), 1, bytes(15) + b"\x01", 2)


@pytest.mark.parametrize("update", [
    FlowUpdate(V4, 7, b"s" * 20, False, "egress", "ingress", 30.0),   # the one-unpack path
    FlowUpdate(V6, 3, b"", False, None, "aa", 1.5),
    FlowUpdate(V4, 9, deleted=True),
    FlowUpdate(V6, 2, deleted=True),
])
def test_flow_records_round_trip(update):
    assert sw.read_flow(sw.flow_record(update)) == update


def test_damaged_upserts_are_refused():
    rec = sw.flow_record(FlowUpdate(V4, 7, b"s" * 20, False, "egress", "ingress", 30.0))
    for value in (rec.value[:-1], rec.value + b"x", rec.value[:30]):
        with pytest.raises(sw.SyncError, match="malformed"):
            sw.read_flow(sw.Record(rec.type, value))
