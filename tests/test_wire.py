"""Tests for the wire codec (dasgd.core.wire).

The oracle is ``_reference_bytes``: an independent encoder written from the layout in the module docstring
with int.to_bytes, zlib and hmac only (no struct, no code from the module). Encoded bytes must equal it
exactly, and hand-crafted malformed messages (which the real encoder refuses to produce) come from it too.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dasgd.core.message import Kind, Message
from dasgd.core.wire import (
    HEADER_SIZE,
    REJECT_REASONS,
    TAG_SIZE,
    WIRE_VERSION,
    WireError,
    WireUsageError,
    decode,
    decode_detached,
    encode,
    encode_into,
    encoded_size,
)

# Hand-written from the spec, deliberately not imported from the module.
CODES = {None: 0, torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4, torch.uint8: 5}
ITEMSIZE = {None: 0, torch.float32: 4, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2, torch.uint8: 1}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8]
U64 = 2**64 - 1

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def _reference_bytes(
    *,
    kind: int,
    sender: int,
    origin: int,
    lo: int = 0,
    hi: int = 0,
    code: int = 0,
    payload_bytes: bytes = b"",
    numel: int = 0,
    clock: list[int] | None = None,
    key: bytes | None = None,
    version: int = 1,
    magic: bytes = b"DSGD",
    flags: int | None = None,
    total_length: int | None = None,
    n_clock: int | None = None,
    fix_crc: bool = True,
) -> bytes:
    """Independent encoder; every field can be overridden to build malformed but well-checksummed bytes."""
    clock = clock or []
    signed = key is not None
    flags = (1 if signed else 0) if flags is None else flags
    n_clock = len(clock) if n_clock is None else n_clock
    clock_bytes = b"".join(v.to_bytes(8, "little", signed=True) for v in clock)
    body_len = 56 + len(clock_bytes) + len(payload_bytes)
    total = body_len + (32 if signed else 0) if total_length is None else total_length
    head = (
        magic
        + bytes([version, kind, code, flags])
        + _le(sender, 4)
        + _le(origin, 4)
        + _le(lo, 8)
        + _le(hi, 8)
        + _le(n_clock, 4)
        + _le(numel, 8)
        + _le(total, 8)
    )
    assert len(head) == 52
    body = head + b"\0\0\0\0" + clock_bytes + payload_bytes
    crc = zlib.crc32(body) if fix_crc else 0
    body = head + _le(crc, 4) + clock_bytes + payload_bytes
    if signed:
        body += hmac.new(key, body, hashlib.sha256).digest()
    return body


def _ref_from_msg(msg: Message, key: bytes | None, raw: bytes) -> bytes:
    dtype = None if msg.payload is None else msg.payload.dtype
    return _reference_bytes(
        kind=int(msg.kind),
        sender=msg.sender,
        origin=msg.origin,
        lo=msg.lo,
        hi=msg.hi,
        code=CODES[dtype],
        payload_bytes=raw,
        numel=0 if msg.payload is None else msg.payload.numel(),
        clock=None if msg.clock is None else [int(v) for v in msg.clock],
        key=key,
    )


def _tensor_from_raw(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).clone()


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(torch.uint8).numpy())


def _reason(buf: object, **kw: object) -> str:
    with pytest.raises(WireError) as info:
        decode(buf, **kw)  # type: ignore[arg-type]
    assert info.value.reason in REJECT_REASONS
    return info.value.reason


# ------------------------------------------------------------------------------------------ strategies


@st.composite
def cases(draw: st.DrawFn, kinds: list[Kind] | None = None, max_numel: int = 24) -> tuple:
    """(message, raw payload bytes, world_size, key)."""
    world = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(kinds or list(Kind)))
    sender = draw(st.integers(0, world - 1))
    origin = draw(st.integers(0, world - 1))
    lo = hi = 0
    if kind == Kind.GRADIENT:
        lo = draw(st.integers(0, U64 - 1))
        hi = draw(st.integers(lo + 1, U64))
    elif kind == Kind.FINAL:
        lo = hi = draw(st.integers(0, U64))
    payload, raw = None, b""
    if kind in (Kind.GRADIENT, Kind.MODEL):
        dtype = draw(st.sampled_from(DTYPES))
        numel = draw(st.integers(0, max_numel))
        raw = draw(st.binary(min_size=numel * ITEMSIZE[dtype], max_size=numel * ITEMSIZE[dtype]))
        payload = _tensor_from_raw(raw, dtype)
    clock = None
    if draw(st.booleans()):
        clock = np.array(draw(st.lists(st.integers(0, 2**63 - 1), min_size=world, max_size=world)), np.int64)
    key = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
    return Message(kind, sender, origin, lo, hi, payload, clock), raw, world, key


def _check_same(got: Message, msg: Message, raw: bytes) -> None:
    assert (got.kind, got.sender, got.origin, got.lo, got.hi) == (
        msg.kind,
        msg.sender,
        msg.origin,
        msg.lo,
        msg.hi,
    )
    assert isinstance(got.kind, Kind)
    if msg.payload is None:
        assert got.payload is None
    else:
        assert got.payload is not None
        assert got.payload.dtype == msg.payload.dtype
        assert got.payload.shape == (msg.payload.numel(),)
        assert _raw(got.payload) == raw  # bytes, so NaN bit patterns compare too
    if msg.clock is None:
        assert got.clock is None
    else:
        assert got.clock is not None and got.clock.dtype == np.int64
        assert got.clock.tolist() == msg.clock.tolist()


# ------------------------------------------------------------------------------------------ layout


def test_sizes_match_the_documented_layout() -> None:
    assert WIRE_VERSION == 1
    assert HEADER_SIZE == 4 + 4 * 1 + 2 * 4 + 2 * 8 + 4 + 8 + 8 + 4 == 56
    assert TAG_SIZE == 32
    # 10 float32 + 4 clock entries + tag = 56 + 32 + 40 + 32
    assert encoded_size(10, torch.float32, 4, True) == 160
    assert encoded_size(0, None, 0, False) == 56
    assert encoded_size(3, torch.bfloat16, 0, False) == 62
    with pytest.raises(WireUsageError):
        encoded_size(3, None, 0, False)
    with pytest.raises(WireUsageError):
        encoded_size(3, torch.int32, 0, False)


def test_encode_matches_hand_built_bytes() -> None:
    msg = Message(
        Kind.GRADIENT, 1, 2, 7, 9, torch.tensor([1.0, -2.0], dtype=torch.float32), np.array([3, 4, 5])
    )
    got = encode(msg)
    assert got[:4] == b"DSGD" and got[4:8] == bytes([1, 1, 1, 0])
    assert got[8:12] == b"\x01\0\0\0" and got[12:16] == b"\x02\0\0\0"
    assert got[36:44] == b"\x02" + b"\0" * 7  # numel
    assert int.from_bytes(got[44:52], "little") == len(got) == 56 + 24 + 8
    assert got[56:64] == b"\x03" + b"\0" * 7
    # IEEE-754 little-endian: 1.0 = 0x3f800000, -2.0 = 0xc0000000
    assert got[80:88] == bytes.fromhex("0000803f000000c0")
    assert got == _reference_bytes(
        kind=1, sender=1, origin=2, lo=7, hi=9, code=1, payload_bytes=got[80:], numel=2, clock=[3, 4, 5]
    )


# ------------------------------------------------------------------------------------------ round trips


@FAST
@given(cases())
def test_round_trip_every_kind_and_dtype(case: tuple) -> None:
    msg, raw, world, key = case
    data = encode(msg, key)
    assert data == _ref_from_msg(msg, key, raw)
    dtype = None if msg.payload is None else msg.payload.dtype
    numel = 0 if msg.payload is None else msg.payload.numel()
    n_clock = 0 if msg.clock is None else world
    assert len(data) == encoded_size(numel, dtype, n_clock, key is not None)
    got = decode(data, world_size=world, key=key, expected_numel=numel, expected_dtype=dtype)
    _check_same(got, msg, raw)
    if key is not None:  # no key on the receiver: the tag is ignored
        _check_same(decode(data, world_size=world), msg, raw)


@FAST
@given(cases(), st.integers(0, 200), st.binary(min_size=1, max_size=1))
def test_encode_into_oversized_buffer_then_decode_whole_buffer(case: tuple, extra: int, fill: bytes) -> None:
    msg, raw, world, key = case
    size = len(_ref_from_msg(msg, key, raw))
    out = torch.full((size + extra,), fill[0], dtype=torch.uint8)
    n = encode_into(msg, out, key)
    assert n == size
    assert bytes(out[:n].numpy()) == _ref_from_msg(msg, key, raw)
    assert bytes(out[n:].numpy()) == fill * extra  # nothing written past the message
    for buf in (out, bytes(out.numpy()), bytearray(out.numpy()), memoryview(out.numpy())):
        _check_same(decode(buf, world_size=world, key=key), msg, raw)


def test_decoded_payload_owns_its_memory() -> None:
    msg = Message(Kind.MODEL, 0, 0, payload=torch.arange(8, dtype=torch.float64), clock=np.array([5]))
    buf = bytearray(encode(msg))
    got = decode(buf, world_size=1)
    buf[56:] = b"\xff" * (len(buf) - 56)
    assert torch.equal(got.payload, torch.arange(8, dtype=torch.float64))
    assert got.clock.tolist() == [5]
    assert got.clock.flags.writeable and got.clock.flags.owndata


def test_large_float32_payload_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(100_000, generator=gen) * 1e3
    msg = Message(Kind.GRADIENT, 3, 1, 10, 42, values, np.arange(4, dtype=np.int64))
    data = encode(msg, b"secret")
    assert len(data) == 56 + 32 + 400_000 + 32
    got = decode(data, world_size=4, expected_numel=100_000, expected_dtype=torch.float32, key=b"secret")
    assert torch.equal(got.payload, values)
    assert got.payload.numpy().tobytes() == values.numpy().tobytes()


def test_non_contiguous_and_multi_dim_payloads_go_in_c_order() -> None:
    base = torch.arange(24, dtype=torch.float32)
    for t, want in (
        (base[::3], [0, 3, 6, 9, 12, 15, 18, 21]),
        (base.reshape(4, 6).t(), [0, 6, 12, 18, 1, 7, 13, 19, 2, 8, 14, 20, 3, 9, 15, 21, 4, 10, 16, 22]),
    ):
        msg = Message(Kind.GRADIENT, 0, 0, 0, 1, t)
        got = decode(encode(msg), world_size=1)
        assert got.payload.tolist()[: len(want)] == [float(v) for v in want]
        out = torch.zeros(512, dtype=torch.uint8)
        n = encode_into(msg, out)
        assert bytes(out[:n].numpy()) == encode(msg)


def test_empty_clock_and_empty_payload() -> None:
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.empty(0, dtype=torch.float16), np.zeros(0, np.int64))
    got = decode(encode(msg), world_size=2)
    assert got.clock is None  # zero entries means "no clock" on the wire
    assert got.payload is not None and got.payload.numel() == 0 and got.payload.dtype == torch.float16


# ------------------------------------------------------------------------------------------ rejection


def _sample(signed: bool) -> tuple[bytes, bytes | None, dict[str, tuple[int, int]]]:
    key = b"k3y" if signed else None
    msg = Message(Kind.GRADIENT, 1, 0, 4, 6, torch.tensor([1.5, -0.25, 3.0]), np.array([2, 9]))
    data = encode(msg, key)
    regions = {"header": (0, 56), "clock": (56, 72), "payload": (72, 84)}
    if signed:
        regions["tag"] = (84, 116)
    assert len(data) == (116 if signed else 84)
    return data, key, regions


@pytest.mark.parametrize("signed", [False, True])
def test_every_truncation_is_rejected(signed: bool) -> None:
    data, key, regions = _sample(signed)
    seen = set()
    for name, (start, stop) in regions.items():
        for cut in range(start, stop):
            assert _reason(data[:cut], world_size=2, key=key) == "truncated", (name, cut)
            seen.add(name)
    assert seen == set(regions)
    # also inside a bigger, partly filled receive buffer: the header says more than arrived
    assert _reason(data[:-1], world_size=2, key=key) == "truncated"


@pytest.mark.parametrize("signed", [False, True])
def test_every_single_byte_flip_is_rejected(signed: bool) -> None:
    data, key, _ = _sample(signed)
    expected_early = {0: "bad_magic", 1: "bad_magic", 2: "bad_magic", 3: "bad_magic", 4: "bad_version"}
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF, 0x5A):
            bad = bytearray(data)
            bad[pos] ^= mask
            reason = _reason(bytes(bad), world_size=2, key=key)
            if pos in expected_early:
                assert reason == expected_early[pos]
            elif pos >= 84:
                assert reason == "auth"  # the tag only: crc does not cover it, the HMAC does
            else:
                assert reason in ("bad_flags", "bad_dtype", "shape", "bad_length", "truncated", "checksum"), (
                    pos,
                    mask,
                    reason,
                )


@FAST
@given(cases(max_numel=6), st.data())
def test_random_flip_of_random_message_never_accepted(case: tuple, data: st.DataObject) -> None:
    msg, _, world, key = case
    buf = bytearray(encode(msg, key))
    limit = len(buf) - (TAG_SIZE if key is not None else 0)
    # Without a key the tag is not checked (by design), so flips there are only tested with the key.
    pos = data.draw(st.integers(0, len(buf) - 1 if key is not None else limit - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    _reason(bytes(buf), world_size=world, key=key)


def test_flipped_tag_is_ignored_without_key_but_rejected_with_it() -> None:
    data, _, _ = _sample(signed=True)
    bad = bytearray(data)
    bad[-1] ^= 1
    assert decode(bytes(bad), world_size=2).lo == 4
    assert _reason(bytes(bad), world_size=2, key=b"k3y") == "auth"


def test_wrong_magic_and_versions() -> None:
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, magic=b"DSGE"), world_size=1) == "bad_magic"
    assert _reason(b"GET / HTTP/1.1\r\n" + b"x" * 100, world_size=1) == "bad_magic"
    for version in (0, 2, 255):
        data = _reference_bytes(kind=3, sender=0, origin=0, version=version)
        assert _reason(data, world_size=1) == "bad_version"


def test_authentication() -> None:
    msg = Message(Kind.STOP, 0, 1)
    signed = encode(msg, b"alpha")
    assert _reason(signed, world_size=2, key=b"beta") == "auth"
    assert _reason(encode(msg), world_size=2, key=b"alpha") == "auth"  # missing tag
    assert decode(signed, world_size=2, key=b"alpha").kind == Kind.STOP
    # a forger without the key recomputes the crc after editing the sender: crc passes, HMAC does not
    forged = _reference_bytes(kind=3, sender=1, origin=1, key=b"guess")
    assert _reason(forged, world_size=2, key=b"alpha") == "auth"
    # a tag-flagged message whose tag is missing from the length is a length error
    no_tag = _reference_bytes(kind=3, sender=0, origin=0, flags=1, total_length=56)
    assert _reason(no_tag, world_size=1, key=b"alpha") == "bad_length"


def test_unknown_sender_or_origin() -> None:
    msg = Message(Kind.FINAL, 3, 0, 5, 5)
    assert decode(encode(msg), world_size=4).sender == 3
    assert _reason(encode(msg), world_size=3) == "unknown_sender"
    assert _reason(encode(Message(Kind.FINAL, 0, 7, 5, 5)), world_size=4) == "unknown_sender"
    assert _reason(_reference_bytes(kind=3, sender=2**32 - 1, origin=0), world_size=4) == "unknown_sender"


@pytest.mark.parametrize(
    ("kind", "lo", "hi", "payload"),
    [
        (1, 5, 5, True),
        (1, 6, 5, True),
        (2, 3, 4, False),
        (3, 0, 1, False),
        (4, 1, 0, False),
        (5, 3, 2, True),  # MODEL: lo <= hi is a tag; lo > hi is invalid
    ],
)
def test_bad_range(kind: int, lo: int, hi: int, payload: bool) -> None:
    pb = b"\0" * 8 if payload else b""
    data = _reference_bytes(
        kind=kind,
        sender=0,
        origin=0,
        lo=lo,
        hi=hi,
        code=1 if payload else 0,
        payload_bytes=pb,
        numel=len(pb) // 4,
    )
    assert _reason(data, world_size=1) == "bad_range"
    with pytest.raises(WireUsageError):  # the encoder refuses to produce it
        encode(Message(Kind(kind), 0, 0, lo, hi, torch.zeros(2) if payload else None))


def test_shape_and_dtype_rules() -> None:
    grad = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(5, dtype=torch.float16))
    data = encode(grad)
    assert _reason(data, world_size=1, expected_numel=6) == "shape"
    assert _reason(data, world_size=1, expected_dtype=torch.float32) == "bad_dtype"
    assert decode(data, world_size=1, expected_numel=5, expected_dtype=torch.float16).payload.numel() == 5
    # control messages have no payload, so expectations about payloads do not apply to them
    stop = encode(Message(Kind.STOP, 0, 0))
    assert decode(stop, world_size=1, expected_numel=6, expected_dtype=torch.float32).payload is None
    # GRADIENT without payload, STOP with one
    assert _reason(_reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1), world_size=1) == "shape"
    with_payload = _reference_bytes(kind=3, sender=0, origin=0, code=5, payload_bytes=b"ab", numel=2)
    assert _reason(with_payload, world_size=1) == "shape"
    # unknown dtype codes, and "no payload" with elements
    assert (
        _reason(_reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, code=6), world_size=1) == "bad_dtype"
    )
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, numel=1), world_size=1) == "shape"


def test_bad_kind_flags_length_and_clock() -> None:
    for kind in (0, 6, 255):
        assert _reason(_reference_bytes(kind=kind, sender=0, origin=0), world_size=1) == "bad_kind"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, flags=2), world_size=1) == "bad_flags"
    long = _reference_bytes(kind=3, sender=0, origin=0, total_length=57) + b"\0"
    assert _reason(long, world_size=1) == "bad_length"
    assert (
        _reason(
            _reference_bytes(kind=3, sender=0, origin=0, numel=0, code=0, total_length=2**64 - 1),
            world_size=1,
        )
        == "bad_length"
    )
    # huge counts that stay consistent with total_length: rejected before anything is allocated
    huge = _reference_bytes(
        kind=1, sender=0, origin=0, lo=0, hi=1, code=2, numel=2**40, total_length=56 + 8 * 2**40
    )
    assert _reason(huge, world_size=1) == "truncated"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2, 3]), world_size=2) == "bad_clock"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, clock=[1, -1]), world_size=2) == "bad_clock"
    assert decode(
        _reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2]), world_size=2
    ).clock.tolist() == [1, 2]
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, fix_crc=False), world_size=1) == "checksum"


# ------------------------------------------------------------------------------------------ fuzzing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 8), st.one_of(st.none(), st.just(b"key")))
def test_random_garbage_only_raises_wire_error(blob: bytes, world: int, key: bytes | None) -> None:
    _reason(blob, world_size=world, key=key)
    # the same garbage behind a valid magic and version gets further into the checks
    _reason(b"DSGD\x01" + blob, world_size=world, key=key)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 3),
    st.integers(0, 2**32 - 1) | st.integers(0, 4),
    st.integers(0, 2**32 - 1) | st.integers(0, 4),
    st.integers(0, U64) | st.integers(0, 4),
    st.integers(0, U64) | st.integers(0, 4),
    st.integers(0, 4),
    st.integers(0, 6),
    st.binary(max_size=80),
)
def test_well_checksummed_random_headers_never_crash(
    kind: int,
    code: int,
    flags: int,
    sender: int,
    origin: int,
    lo: int,
    hi: int,
    n_clock: int,
    numel: int,
    rest: bytes,
) -> None:
    """Headers with valid magic, version, length and crc but random fields reach the semantic checks;
    whatever the combination, the result is a Message or a WireError."""
    dtype_by_code = {v: k for k, v in CODES.items()}
    body_len = 56 + 8 * n_clock + numel * ITEMSIZE[dtype_by_code.get(code)]
    signed = bool(flags & 1)
    total = body_len + (32 if signed else 0)
    # clock and payload bytes travel together in payload_bytes; n_clock is overridden to match
    tail = ((rest or b"\x07") * (body_len + 1))[: body_len - 56]
    data = _reference_bytes(
        kind=kind,
        sender=sender,
        origin=origin,
        lo=lo,
        hi=hi,
        code=code,
        payload_bytes=tail,
        numel=numel,
        flags=flags,
        n_clock=n_clock,
        total_length=total,
        key=b"x" if signed else None,
    )
    try:
        got = decode(data, world_size=4)
    except WireError as err:
        assert err.reason in REJECT_REASONS
    else:
        assert isinstance(got, Message) and 0 <= got.sender < 4 and 0 <= got.origin < 4


# ------------------------------------------------------------------------------------------ usage errors


def test_usage_errors_are_value_errors() -> None:
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(4))
    with pytest.raises(ValueError, match="needs 72"):
        encode_into(msg, torch.zeros(71, dtype=torch.uint8))
    with pytest.raises(ValueError):
        encode_into(msg, torch.zeros(100, dtype=torch.float32))
    with pytest.raises(ValueError):
        encode(Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(4, dtype=torch.int32)))
    with pytest.raises(ValueError):
        encode(Message(Kind.GRADIENT, -1, 0, 0, 1, torch.zeros(4)))
    with pytest.raises(ValueError):
        encode(Message(Kind.STOP, 0, 0, clock=np.array([-1, 0])))
    with pytest.raises(ValueError):
        encode(msg, key=b"")
    with pytest.raises(WireUsageError):
        decode("not bytes", world_size=1)  # type: ignore[arg-type]
    assert not issubclass(WireUsageError, WireError)


# ------------------------------------------------------------------------------------------ detached payloads
# Flags bit 1: the header announces a payload that travels on a separate data plane (split-plane transport).
# The oracle is the same independent reference encoder: flags=2 (| 1 when signed), the payload's dtype code and
# numel, and no payload bytes.


def _ref_detached(msg: Message, key: bytes | None) -> bytes:
    dtype = msg.payload.dtype
    return _reference_bytes(
        kind=int(msg.kind),
        sender=msg.sender,
        origin=msg.origin,
        lo=msg.lo,
        hi=msg.hi,
        code=CODES[dtype],
        numel=msg.payload.numel(),
        clock=None if msg.clock is None else [int(v) for v in msg.clock],
        key=key,
        flags=2 | (1 if key is not None else 0),
    )


@FAST
@given(cases(kinds=[Kind.GRADIENT, Kind.MODEL], max_numel=40))
def test_detached_round_trip(case: tuple) -> None:
    msg, _, world, key = case
    data = encode(msg, key, detached=True)
    assert data == _ref_detached(msg, key)
    n_clock = 0 if msg.clock is None else world
    numel = msg.payload.numel()
    want_len = 56 + 8 * n_clock + (32 if key is not None else 0)  # no payload bytes, whatever numel is
    assert (
        len(data)
        == want_len
        == encoded_size(numel, msg.payload.dtype, n_clock, key is not None, detached=True)
    )
    out = torch.full((want_len + 7,), 0xAB, dtype=torch.uint8)
    assert encode_into(msg, out, key, detached=True) == want_len
    assert bytes(out[:want_len].numpy()) == data and bytes(out[want_len:].numpy()) == b"\xab" * 7

    got, detached, got_numel, got_dtype = decode_detached(data, world_size=world, key=key)
    assert detached and got_numel == numel and got_dtype == msg.payload.dtype
    _check_same(got, Message(msg.kind, msg.sender, msg.origin, msg.lo, msg.hi, None, msg.clock), b"")
    # decode with allow_detached gives the same message, and the expectations apply to the declared payload
    alt = decode(
        data,
        world_size=world,
        key=key,
        allow_detached=True,
        expected_numel=numel,
        expected_dtype=msg.payload.dtype,
    )
    assert alt.payload is None and (alt.lo, alt.hi, alt.sender) == (msg.lo, msg.hi, msg.sender)


@FAST
@given(cases(max_numel=8))
def test_decode_detached_accepts_inline_messages_and_says_so(case: tuple) -> None:
    msg, raw, world, key = case
    res = decode_detached(encode(msg, key), world_size=world, key=key)
    assert not res.detached
    _check_same(res.message, msg, raw)
    if msg.payload is None:
        assert (res.numel, res.dtype) == (0, None)
    else:
        assert (res.numel, res.dtype) == (msg.payload.numel(), msg.payload.dtype)


def test_detached_header_bytes_by_hand() -> None:
    payload = torch.zeros(1000, dtype=torch.float64)
    msg = Message(Kind.GRADIENT, 2, 1, 5, 9, payload, np.array([7, 0, 3]))
    data = encode(msg, detached=True)
    assert data[4:8] == bytes([1, 1, 2, 2])  # version, kind GRADIENT, dtype float64, flags: detached only
    assert int.from_bytes(data[36:44], "little") == 1000  # numel says what the data plane carries
    assert int.from_bytes(data[44:52], "little") == len(data) == 56 + 24
    body = data[:52] + b"\0\0\0\0" + data[56:]
    assert int.from_bytes(data[52:56], "little") == zlib.crc32(body)  # crc: header and clock, nothing else
    signed = encode(msg, b"k", detached=True)
    assert signed[7] == 3 and len(signed) == 80 + 32
    assert signed[80:] == hmac.new(b"k", signed[:80], hashlib.sha256).digest()


def test_detached_flag_is_refused_by_default() -> None:
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.ones(4))
    data = encode(msg, detached=True)
    assert _reason(data, world_size=1) == "bad_flags"
    assert _reason(encode(msg, b"key", detached=True), world_size=1, key=b"key") == "bad_flags"
    assert decode(data, world_size=1, allow_detached=True).payload is None
    # unknown bits stay unknown even where the detached bit is allowed
    for flags in (4, 6, 0x80):
        data = _reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, code=1, numel=4, flags=flags)
        with pytest.raises(WireError) as info:
            decode_detached(data, world_size=1)
        assert info.value.reason == "bad_flags"


def test_detached_crc_covers_header_and_clock_only() -> None:
    msg = Message(Kind.MODEL, 1, 1, payload=torch.ones(3), clock=np.array([4, 5]))
    data = encode(msg, detached=True)
    assert len(data) == 56 + 16
    expected_early = {0: "bad_magic", 1: "bad_magic", 2: "bad_magic", 3: "bad_magic", 4: "bad_version"}
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(WireError) as info:
            decode_detached(bytes(bad), world_size=2)
        reason = info.value.reason
        if pos in expected_early:
            assert reason == expected_early[pos]
        else:
            # a flip of numel (36..43) changes no length: only the crc can catch it, and does
            assert reason in ("bad_flags", "bad_dtype", "shape", "bad_length", "checksum"), (pos, reason)
            if 36 <= pos < 44 or 8 <= pos < 32 or pos >= 52:
                assert reason == "checksum", (pos, reason)
    # bytes after total_length are not part of the message: a receive buffer may hold anything there
    got = decode_detached(data + b"\xff" * 100, world_size=2)
    assert got.detached and got.numel == 3 and got.message.clock.tolist() == [4, 5]


def test_detached_authentication() -> None:
    msg = Message(Kind.GRADIENT, 0, 1, 2, 3, torch.ones(6, dtype=torch.float16))
    signed = encode(msg, b"alpha", detached=True)
    assert decode_detached(signed, world_size=2, key=b"alpha").numel == 6
    with pytest.raises(WireError, match="auth"):
        decode_detached(signed, world_size=2, key=b"beta")
    # a forger without the key changes numel and fixes the crc: the HMAC still catches it
    forged = _reference_bytes(kind=1, sender=0, origin=1, lo=2, hi=3, code=3, numel=7, flags=3, key=b"guess")
    with pytest.raises(WireError) as info:
        decode_detached(forged, world_size=2, key=b"alpha")
    assert info.value.reason == "auth"


def test_detached_rules() -> None:
    grad = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(5, dtype=torch.float16))
    data = encode(grad, detached=True)
    for kw, reason in (({"expected_numel": 6}, "shape"), ({"expected_dtype": torch.float32}, "bad_dtype")):
        with pytest.raises(WireError) as info:
            decode_detached(data, world_size=1, **kw)
        assert info.value.reason == reason
    # a huge declared numel allocates nothing: it is only reported, for the caller to refuse
    huge = _reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, code=2, numel=2**60, flags=2)
    assert decode_detached(huge, world_size=1).numel == 2**60
    # the detached bit on a message that has no payload, with or without a dtype code
    stop = _reference_bytes(kind=3, sender=0, origin=0, flags=2)
    no_code = _reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, flags=2)
    ctrl_code = _reference_bytes(kind=3, sender=0, origin=0, code=1, numel=2, flags=2)
    for bad in (stop, no_code, ctrl_code):
        with pytest.raises(WireError) as info:
            decode_detached(bad, world_size=1)
        assert info.value.reason == "shape"
    # a detached header that counts payload bytes in its length is a length error
    long = _reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, code=1, numel=2, flags=2, total_length=64)
    with pytest.raises(WireError) as info:
        decode_detached(long + b"\0" * 8, world_size=1)
    assert info.value.reason == "bad_length"
    # the encoder refuses to detach nothing
    with pytest.raises(WireUsageError):
        encode(Message(Kind.FINAL, 0, 0, 3, 3), detached=True)
    with pytest.raises(WireUsageError):
        encode_into(Message(Kind.STOP, 0, 0), torch.zeros(100, dtype=torch.uint8), detached=True)


def test_detached_encode_does_not_touch_payload_values() -> None:
    """Only numel and dtype are read: a non-contiguous payload is not gathered, and its values do not matter."""
    base = torch.arange(30, dtype=torch.float32).reshape(5, 6).t()  # non-contiguous
    a = encode(Message(Kind.GRADIENT, 0, 0, 0, 1, base), detached=True)
    b = encode(Message(Kind.GRADIENT, 0, 0, 0, 1, torch.full((30,), -1.0)), detached=True)
    assert a == b and int.from_bytes(a[36:44], "little") == 30


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 7),
    st.integers(0, 3),
    st.integers(0, 5),
    st.integers(0, 4),
    st.integers(0, 2**64 - 1) | st.integers(0, 8),
    st.binary(max_size=40),
)
def test_random_detached_headers_never_crash(
    kind: int, code: int, flags: int, sender: int, n_clock: int, numel: int, rest: bytes
) -> None:
    signed = bool(flags & 1)
    body_len = 56 + 8 * n_clock
    tail = ((rest or b"\x01") * (body_len + 1))[: body_len - 56]
    data = _reference_bytes(
        kind=kind,
        sender=sender,
        origin=0,
        lo=0,
        hi=1,
        code=code,
        payload_bytes=tail,
        numel=numel,
        flags=flags | 2,
        n_clock=n_clock,
        total_length=body_len + (32 if signed else 0),
        key=b"x" if signed else None,
    )
    try:
        res = decode_detached(data, world_size=4)
    except WireError as err:
        assert err.reason in REJECT_REASONS
    else:
        assert res.detached and res.message.payload is None and res.dtype is not None
        assert res.numel == numel and res.message.kind in (Kind.GRADIENT, Kind.MODEL)


# ------------------------------------------------------------------------------------------ exact reasons
# A rejection is counted by its reason and logged with its detail: the detail must name the numbers that
# were wrong. Each case below is built by the reference encoder; the expected text is worked out by hand
# from the bytes (lengths, codes, fields), not copied from the module's output.

# Five float16 zeros (code 3, 2 bytes each), from the reference encoder: nothing of the module runs at import.
_GRAD_F16 = _reference_bytes(
    kind=1, sender=0, origin=0, lo=0, hi=1, code=3, payload_bytes=b"\0" * 10, numel=5
)


def _rejection(buf: object, **kw: object) -> str:
    with pytest.raises(WireError) as info:
        decode(buf, **kw)  # type: ignore[arg-type]
    text = str(info.value)
    assert text.startswith(f"rejected message ({info.value.reason}): ")
    return text


_REJECTIONS = [
    (b"DSGD" + b"\0" * 6, {}, "(truncated): 10 bytes, fewer than the 56-byte header"),
    (
        _reference_bytes(kind=3, sender=0, origin=0, magic=b"DSGE"),
        {},
        "(bad_magic): starts with b'DSGE', not b'DSGD': not a dasgd message",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, version=2),
        {},
        "(bad_version): wire version 2, this build speaks 1; run the same dasgd everywhere",
    ),
    (_reference_bytes(kind=3, sender=0, origin=0, flags=4), {}, "(bad_flags): unknown flag bits 0x04"),
    (
        _reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, code=1, numel=4, flags=2),
        {},
        "(bad_flags): detached payload (flags bit 1) but whole messages are expected here; decode "
        "split-plane headers with allow_detached=True or decode_detached()",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, code=6),
        {},
        "(bad_dtype): unknown payload dtype code 6",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, numel=1),
        {},
        "(shape): no-payload dtype code with numel=1",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, flags=2),
        {"allow_detached": True},
        "(shape): detached payload announced with the no-payload dtype code",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, total_length=57) + b"\0",
        {},
        "(bad_length): total_length 57 but the header implies 56 bytes",
    ),
    (  # a STOP with a 2-entry clock is 56 + 16 = 72 bytes; one is missing
        _reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2])[:71],
        {"world_size": 2},
        "(truncated): message is 72 bytes but only 71 arrived",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, fix_crc=False),
        {},
        "(checksum): crc32 mismatch: the message was corrupted in transit",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0),
        {"key": b"k"},
        "(auth): unsigned message but a shared secret is set; give every worker the key",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, key=b"guess"),
        {"key": b"k"},
        "(auth): HMAC tag does not match: forged, or the workers' secrets differ",
    ),
    (_reference_bytes(kind=6, sender=0, origin=0), {}, "(bad_kind): unknown message kind 6"),
    (  # origin == world_size is already outside: workers are 0..3
        _reference_bytes(kind=2, sender=0, origin=4, lo=5, hi=5),
        {"world_size": 4},
        "(unknown_sender): sender 0 / origin 4 outside a world of 4 workers",
    ),
    (
        _reference_bytes(kind=1, sender=0, origin=0, lo=5, hi=5, code=1, payload_bytes=b"\0" * 8, numel=2),
        {},
        "(bad_range): id range [5, 5) is invalid for GRADIENT",
    ),
    (_reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1), {}, "(shape): GRADIENT needs a payload"),
    (
        _reference_bytes(kind=3, sender=0, origin=0, code=5, payload_bytes=b"ab", numel=2),
        {},
        "(shape): STOP must not carry a payload",
    ),
    (_GRAD_F16, {"expected_numel": 6}, "(shape): payload has 5 elements, expected 6"),
    (
        _GRAD_F16,
        {"expected_dtype": torch.float32},
        "(bad_dtype): payload dtype torch.float16, expected torch.float32",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2, 3]),
        {"world_size": 2},
        "(bad_clock): clock has 3 entries; expected 0 or world_size=2",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, clock=[1, -1]),
        {"world_size": 2},
        "(bad_clock): negative vector clock entry",
    ),
]


@pytest.mark.parametrize(
    ("data", "kw", "want"),
    _REJECTIONS,
    ids=[f"{i}-{want[1 : want.index(')')]}" for i, (_, _, want) in enumerate(_REJECTIONS)],
)
def test_every_rejection_names_what_was_wrong(data: bytes, kw: dict, want: str) -> None:
    assert _rejection(data, **{"world_size": 1, **kw}) == "rejected message " + want


def test_a_wire_error_only_takes_a_documented_reason() -> None:
    with pytest.raises(ValueError) as info:
        WireError("nope", "detail")
    assert str(info.value) == f"unknown wire reject reason 'nope'; use one of {REJECT_REASONS}"


def _usage(call: object, *args: object, **kw: object) -> str:
    with pytest.raises(WireUsageError) as info:
        call(*args, **kw)  # type: ignore[operator]
    return str(info.value)


def test_sizes_and_keys_reject_bad_arguments_by_name() -> None:
    assert _usage(encoded_size, -1, torch.float32, 0, False) == "numel (-1) and n_clock (0) must be >= 0"
    assert _usage(encoded_size, 0, None, -1, False) == "numel (0) and n_clock (-1) must be >= 0"
    assert _usage(encoded_size, 3, None, 0, False) == "numel is 3 but dtype is None; pass the payload dtype"
    assert _usage(encoded_size, 3, torch.int32, 0, False) == (
        "payload dtype torch.int32 cannot be sent; use one of "
        "['torch.bfloat16', 'torch.float16', 'torch.float32', 'torch.float64', 'torch.uint8']"
    )
    msg = Message(Kind.STOP, 0, 0)
    out = torch.zeros(200, dtype=torch.uint8)
    data = encode(msg)
    empty = "the shared secret is empty; pass key=None to disable authentication"
    not_bytes = "the shared secret must be bytes, got str"
    for call, args in ((encode, (msg,)), (encode_into, (msg, out)), (decode, (data,))):
        kw = {"world_size": 1} if call is decode else {}
        assert _usage(call, *args, key=b"", **kw) == empty
        assert _usage(call, *args, key="k", **kw) == not_bytes
    assert _usage(decode, data, world_size=0) == "world_size must be >= 1, got 0"
    assert _usage(decode, data, world_size=1, expected_dtype=torch.int32) == (
        "expected_dtype torch.int32 is not a wire dtype"
    )


@pytest.mark.parametrize(
    ("msg", "want"),
    [
        (Message(Kind.STOP, 0.5, 0), "message sender must be an integer, got float"),  # type: ignore[arg-type]
        (Message(Kind.STOP, -1, 0), "message sender=-1 does not fit the wire field (0..4294967295)"),
        (
            Message(Kind.STOP, 0, 2**32),
            "message origin=4294967296 does not fit the wire field (0..4294967295)",
        ),
        (
            Message(Kind.MODEL, 0, 0, -1, 0, torch.ones(1)),
            "message lo=-1 does not fit the wire field (0..18446744073709551615)",
        ),
        (
            Message(Kind.MODEL, 0, 0, 0, 2**64, torch.ones(1)),
            "message hi=18446744073709551616 does not fit the wire field (0..18446744073709551615)",
        ),
        (Message(9, 0, 0), "message kind 9 is not a dasgd Kind"),  # type: ignore[arg-type]
        (
            Message(Kind.GRADIENT, 0, 0, 3, 3, torch.ones(1)),
            "GRADIENT needs lo < hi, got [3, 3); an empty range holds nothing",
        ),
        (Message(Kind.FINAL, 0, 0, 2, 3), "FINAL needs lo == hi (the total count), got lo=2, hi=3"),
        (
            Message(Kind.MODEL, 0, 0, 3, 2, torch.ones(1)),
            "MODEL needs lo <= hi (the algorithm's tag), got lo=3, hi=2",
        ),
        (Message(Kind.STOP, 0, 0, 1, 0), "STOP carries no id range; set lo=hi=0 (got 1, 0)"),
        (Message(Kind.GRADIENT, 0, 0, 0, 1), "GRADIENT needs a payload tensor, got None"),
        (
            Message(Kind.STOP, 0, 0, payload=torch.ones(1)),
            "STOP is a control message and must have payload=None",
        ),
        (Message(Kind.GRADIENT, 0, 0, 0, 1, [1.0]), "payload must be a torch.Tensor, got list"),  # type: ignore[arg-type]
        (
            Message(Kind.STOP, 0, 0, clock=np.array([[0, 1]])),
            "clock must be a 1-D integer array, got shape (1, 2) int64",
        ),
        (
            Message(Kind.STOP, 0, 0, clock=np.array([0.0, 1.0])),
            "clock must be a 1-D integer array, got shape (2,) float64",
        ),
        (
            Message(Kind.STOP, 0, 0, clock=np.array([-1, 0])),
            "clock entries are gradient counts: each must be in 0..2**63-1",
        ),
        (
            Message(Kind.STOP, 0, 0, clock=np.array([2**63], dtype=np.uint64)),
            "clock entries are gradient counts: each must be in 0..2**63-1",
        ),
        (  # two rules broken: the payload's is reported, in decode's order (payload before clock)
            Message(Kind.GRADIENT, 0, 0, 0, 1, torch.ones(2, dtype=torch.int32), np.array([-1])),
            "payload dtype torch.int32 cannot be sent; use one of "
            "['torch.bfloat16', 'torch.float16', 'torch.float32', 'torch.float64', 'torch.uint8']",
        ),
    ],
)
def test_the_encoder_names_the_broken_rule(msg: Message, want: str) -> None:
    assert _usage(encode, msg) == want
    assert _usage(encode_into, msg, torch.zeros(200, dtype=torch.uint8)) == want


def test_nothing_to_detach_is_a_usage_error_with_its_reason() -> None:
    assert _usage(encode, Message(Kind.FINAL, 0, 0, 3, 3), detached=True) == (
        "FINAL has no payload to detach; encode it with detached=False (only GRADIENT and MODEL payloads "
        "travel on a data plane)"
    )


def test_output_and_input_buffers_are_checked_with_their_description() -> None:
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(4))  # 56 + 16 bytes, + 32 when signed
    assert _usage(encode_into, msg, bytearray(100)) == "out must be a torch.Tensor, got bytearray"
    for out, desc in (
        (torch.zeros(10, 20, dtype=torch.uint8), "torch.uint8 shape (10, 20)"),
        (torch.zeros(400, dtype=torch.uint8)[::2], "torch.uint8 shape (200,)"),
        (torch.zeros(100, dtype=torch.float32), "torch.float32 shape (100,)"),
    ):
        assert _usage(encode_into, msg, out) == (
            f"out must be a contiguous 1-D uint8 CPU tensor, got {desc} on cpu; "
            "allocate it with torch.empty(n, dtype=torch.uint8)"
        )
    # the tag counts: a buffer one byte short of the signed size is refused before anything is written
    assert _usage(encode_into, msg, torch.zeros(103, dtype=torch.uint8), b"k") == (
        "out holds 103 bytes but the message needs 104; size it with encoded_size()"
    )
    data = encode(msg)
    assert _usage(decode, "not bytes", world_size=1) == (
        "decode needs bytes, bytearray, memoryview or a uint8 tensor, got str"
    )
    for buf, desc in (
        (torch.zeros(100, dtype=torch.float32), "torch.float32 shape (100,)"),
        (torch.zeros(2, 72, dtype=torch.uint8), "torch.uint8 shape (2, 72)"),
        (torch.frombuffer(bytearray(data * 2), dtype=torch.uint8)[::2], "torch.uint8 shape (72,)"),
    ):
        assert _usage(decode, buf, world_size=1) == (
            f"a tensor buffer must be a contiguous 1-D uint8 CPU tensor, got {desc} on cpu"
        )
    # A strided typed view cannot be read as bytes in place.
    strided = np.frombuffer(data * 2, dtype=np.uint16)[::2]
    assert _usage(decode, strided, world_size=1) == "decode needs a C-contiguous byte buffer"


def test_typed_and_multi_dimensional_receive_buffers_decode_as_bytes() -> None:
    # The layout keeps clock and payload 8-byte aligned so that a receive buffer may be a typed array; the
    # decoder must read it as bytes whatever the element type or shape.
    msg = Message(
        Kind.GRADIENT, 1, 0, 4, 6, torch.tensor([1.5, -0.25, 3.0], dtype=torch.float64), np.array([2, 9])
    )
    data = encode(msg, b"k")  # 56 + 16 + 24 + 32 = 128 bytes
    raw = _raw(msg.payload)
    for buf in (
        np.frombuffer(data, dtype=np.float64),
        np.frombuffer(data, dtype=np.int32),
        np.frombuffer(data, dtype=np.uint8).reshape(2, 64),
        memoryview(data).cast("B", (4, 32)),
    ):
        _check_same(decode(buf, world_size=2, key=b"k"), msg, raw)


def test_encoder_field_limits_are_inclusive() -> None:
    top_u32, top_u64 = 2**32 - 1, 2**64 - 1
    assert encode(Message(Kind.STOP, top_u32, top_u32)) == _reference_bytes(
        kind=3, sender=top_u32, origin=top_u32
    )
    assert encode(Message(Kind.FINAL, 0, 0, top_u64, top_u64)) == _reference_bytes(
        kind=2, sender=0, origin=0, lo=top_u64, hi=top_u64
    )


def test_a_clock_may_fill_its_count_field_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    # The n_clock field is a u32; a real 2^32-entry clock takes 32 GiB, so the field's limit is lowered here
    # to check the boundary: as many entries as the field holds is fine, one more is refused.
    import dasgd.core.wire as wire_module

    monkeypatch.setattr(wire_module, "_U32_MAX", 3)
    three = Message(Kind.STOP, 0, 0, clock=np.array([1, 2, 3]))
    assert encode(three) == _reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2, 3])
    four = Message(Kind.STOP, 0, 0, clock=np.array([1, 2, 3, 4]))
    assert _usage(encode, four) == "clock has 4 entries, more than the wire allows"


def test_strided_payload_into_a_misaligned_buffer_is_staged_correctly() -> None:
    # out starts at an odd address, so the payload bytes cannot be viewed as float32 in place: the encoder
    # falls back to a staging copy, and the bytes must still be exactly encode()'s.
    payload = torch.arange(24, dtype=torch.float32)[::3]
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, payload, np.array([5]))
    out = torch.zeros(300, dtype=torch.uint8)[1:]
    n = encode_into(msg, out)
    assert bytes(out[:n].numpy()) == encode(msg)
    assert decode(out, world_size=1).payload.tolist() == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0]


def test_a_strided_buffer_is_refused_as_a_usage_error_not_a_buffer_error():
    """A non-contiguous 1-D byte view (every other byte of a valid message) is a caller's mistake."""
    import numpy as np

    from dasgd.core.wire import WireUsageError, decode, encode

    data = encode(Message(Kind.GRADIENT, 0, 0, 0, 1, torch.ones(4)))
    doubled = bytes(b for pair in zip(data, data, strict=True) for b in pair)
    for strided in (memoryview(doubled)[::2], np.frombuffer(doubled, dtype=np.uint8)[::2]):
        with pytest.raises(WireUsageError, match="C-contiguous"):
            decode(strided, world_size=1)
    assert decode(bytes(memoryview(doubled)[::2]), world_size=1).hi == 1  # copied, it decodes
