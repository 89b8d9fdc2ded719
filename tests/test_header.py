"""The raw header codec used on the per-packet path: every refusal has a reason."""

from __future__ import annotations

import pytest

from dataplane import header as wire

GOOD = wire.pack(chain=9, index=2, code=0xABC, client=5, epoch=3)


def reason(buf: bytes) -> str:
    with pytest.raises(wire.HeaderError) as err:
        wire.decode(buf)
    return err.value.reason


def test_round_trip():
    h = wire.decode(GOOD + b"payload")
    assert (h.chain, h.index, h.code, h.client, h.epoch, h.length) == (9, 2, 0xABC, 5, 3, 20)
    assert h.encode() == GOOD


@pytest.mark.parametrize("buf,why", [
    (GOOD[:19], "truncated"),
    (bytes([0x20]) + GOOD[1:], "bad_version"),
    (bytes([0x00]) + GOOD[1:], "bad_version"),
    (GOOD[:2] + bytes([4]) + GOOD[3:], "bad_length"),
    (GOOD[:2] + bytes([6]) + GOOD[3:], "bad_length"),
    (GOOD[:1] + bytes([0]) + GOOD[2:], "ttl_expired"),
    (GOOD[:3] + bytes([9]) + GOOD[4:], "bad_next_proto"),
])
def test_refusals(buf, why):
    assert reason(buf) == why


def test_options_are_skipped_by_length():
    buf = GOOD[:2] + bytes([6]) + GOOD[3:] + b"\x00" * 4 + b"inner"
    assert wire.decode(buf).length == 24
