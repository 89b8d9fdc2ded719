"""The raw header codec used on the per-packet path: every refusal has a reason."""

from __future__ import annotations

import pytest

from dataplane.core import header as wire

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


def test_gso_option_round_trip_and_refusals():
    opt = wire.pack_gso(1, 1, 66, 1448, 34, 16)
    assert len(opt) == 12
    data = wire.pack(1, 2, 3, 4, 5, words=8) + opt + b"\x45" + bytes(19)
    h = wire.decode(data)
    assert h.length == 32 and wire.read_gso(data[20:h.length]) == (1, 1, 66, 1448, 34, 16)
    assert wire.read_gso(b"") is None
    assert wire.read_gso(bytes([9, 2, 0, 0]) + opt) == (1, 1, 66, 1448, 34, 16)  # unknown skipped
    assert wire.read_gso(bytes(4)) is None                                         # padding
    for bad in (bytes([1, 10, 0, 0]), bytes([1, 2, 0, 0])):          # past the end; wrong size
        with pytest.raises(wire.HeaderError, match="bad_option"):
            wire.read_gso(bad)
