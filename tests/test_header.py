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


def test_a_refused_option_names_its_reason_and_says_why():
    """The drop counter's name is the reason exactly; the message carries
    what was wrong, for the log."""
    opt = wire.pack_gso(1, 1, 66, 1448, 34, 16)
    cases = [(opt[:-2], "option 1 runs past the header"),            # 2 bytes short
             (bytes([1, 2, 0, 0]), "GSO option of 2 bytes")]
    for bad, why in cases:
        with pytest.raises(wire.HeaderError) as err:
            wire.read_gso(bad)
        assert err.value.reason == "bad_option"
        assert str(err.value) == f"bad_option: {why}"
    with pytest.raises(wire.HeaderError) as err:                   # no detail: the reason alone
        wire.decode(GOOD[:1] + bytes([0]) + GOOD[2:])
    assert str(err.value) == "ttl_expired"


def test_options_are_walked_by_their_own_padded_lengths():
    # an unknown option of 2 bytes, then one of 6 whose value holds a zero
    # where a walker that lost its place would read "padding"
    walk = bytes([9, 2, 0, 0]) + bytes([9, 6, 7, 7, 0, 0, 0, 0])
    opt = wire.pack_gso(1, 1, 66, 1448, 34, 16)
    assert wire.read_gso(walk + opt) == (1, 1, 66, 1448, 34, 16)
    # an unknown empty option ending the bytes exactly is skipped, not refused
    assert wire.read_gso(bytes([9, 0])) is None
    # one byte left is no option: refused, not read past the end
    with pytest.raises(wire.HeaderError) as err:
        wire.read_gso(bytes([9, 2, 0, 0, 9]))
    assert err.value.reason == "bad_option"


def test_every_field_survives_encode():
    h = wire.Header(chain=300, index=7, code=2**32 - 1, client=77, epoch=12, flags=int(wire.Flags.REVERSE),
                    ttl=9, next_proto=int(wire.NextProto.IPV6))
    back = wire.decode(h.encode())
    assert back == h._replace(length=wire.HEADER_LEN)
    assert back.next_proto == wire.NextProto.IPV6 and back.ttl == 9 and back.flags == wire.Flags.REVERSE


def test_a_header_at_an_offset_is_read_and_measured_from_there():
    assert wire.decode(b"\xee" * 3 + GOOD + b"x", 3) == wire.decode(GOOD + b"x")
    cases = [(b"\xee" * 3 + GOOD[:19], 3, "truncated: 19 bytes < 20"),
             (b"\xee" * 4 + GOOD[:2] + bytes([6]) + GOOD[3:] + bytes(3), 4, "bad_length: length 6 words"),
             (bytes([0x20]) + GOOD[1:], 0, "bad_version: version 2")]
    for buf, offset, message in cases:
        with pytest.raises(wire.HeaderError) as err:
            wire.decode(buf, offset)
        assert str(err.value) == message
