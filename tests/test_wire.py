"""Tests for the wire codec (dasgd.core.wire), version 2.

The oracle is ``_reference_bytes``: an independent encoder written from the layout in the module docstring
with int.to_bytes, zlib, hashlib and hmac only (no struct, no code from the module). Encoded bytes must equal
it exactly, and hand-crafted malformed messages (which the real encoder refuses to produce) come from it too.
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
    MAX_ID,
    REJECT_REASONS,
    TAG_SIZE,
    WIRE_VERSION,
    Link,
    WireError,
    WireUsageError,
    check_hello,
    decode,
    decode_detached,
    encode,
    encode_hello,
    encode_into,
    encoded_size,
    verify_payload,
)

# Hand-written from the spec, deliberately not imported from the module.
CODES = {None: 0, torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4, torch.uint8: 5}
ITEMSIZE = {None: 0, torch.float32: 4, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2, torch.uint8: 1}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8]
U64 = 2**64 - 1
I64 = 2**63 - 1
NONCE = bytes(range(100, 116))
OTHER_NONCE = bytes(range(16))
UNKNOWN_KIND = max(int(k) for k in Kind) + 1

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _le(value: int, size: int) -> bytes:
    return value.to_bytes(size, "little")


def _reference_bytes(
    *,
    kind: int,
    sender: int,
    origin: int,
    receiver: int = 0,
    seq: int = 1,
    lo: int = 0,
    hi: int = 0,
    code: int = 0,
    payload_bytes: bytes = b"",
    numel: int = 0,
    clock: list[int] | None = None,
    key: bytes | None = None,
    version: int = 2,
    magic: bytes = b"DSGD",
    flags: int | None = None,
    total_length: int | None = None,
    n_clock: int | None = None,
    nonce: bytes = NONCE,
    digest: bytes = b"\0" * 32,
    reserved: int = 0,
    tag: bytes | None = None,
    fix_crc: bool = True,
) -> bytes:
    """Independent encoder; every field can be overridden to build malformed but well-checksummed bytes.
    ``payload_bytes`` are the bytes after the clock (an inline payload, or anything for a bad message)."""
    clock = clock or []
    signed = key is not None
    flags = (1 if signed else 0) if flags is None else flags
    n_clock = len(clock) if n_clock is None else n_clock
    clock_bytes = b"".join(v.to_bytes(8, "little", signed=True) for v in clock)
    total = 152 + len(clock_bytes) + len(payload_bytes) if total_length is None else total_length
    before_crc = (
        magic
        + bytes([version, kind, code, flags])
        + _le(sender, 4)
        + _le(receiver, 4)
        + _le(origin, 4)
        + _le(n_clock, 4)
        + _le(seq, 8)
        + _le(lo, 8)
        + _le(hi, 8)
        + _le(numel, 8)
        + _le(total, 8)
        + nonce
        + digest
    )
    assert len(before_crc) == 112
    rest = clock_bytes + payload_bytes
    zero_crc = before_crc + b"\0" * 4 + _le(reserved, 4) + b"\0" * 32 + rest
    crc = zlib.crc32(zero_crc) if fix_crc else 0
    with_crc = before_crc + _le(crc, 4) + _le(reserved, 4)
    if tag is None:
        tag = hmac.new(key, with_crc + b"\0" * 32 + rest, hashlib.sha256).digest() if signed else b"\0" * 32
    return with_crc + tag + rest


def _ref_from_msg(
    msg: Message, key: bytes | None, raw: bytes, receiver: int = 0, seq: int = 1, nonce: bytes = NONCE
) -> bytes:
    dtype = None if msg.payload is None else msg.payload.dtype
    return _reference_bytes(
        kind=int(msg.kind),
        sender=msg.sender,
        receiver=receiver,
        origin=msg.origin,
        seq=seq,
        lo=msg.lo,
        hi=msg.hi,
        code=CODES[dtype],
        payload_bytes=raw,
        numel=0 if msg.payload is None else msg.payload.numel(),
        clock=None if msg.clock is None else [int(v) for v in msg.clock],
        key=key,
        nonce=nonce,
    )


def _link(sender: int = 0, receiver: int = 0, nonce: bytes = NONCE) -> Link:
    return Link(nonce, sender, receiver)


def _enc(msg: Message, key: bytes | None = None, receiver: int = 0, seq: int = 1, **kw: object) -> bytes:
    return encode(msg, key, link=_link(msg.sender, receiver), seq=seq, **kw)  # type: ignore[arg-type]


def _dec(buf: object, world_size: int = 1, sender: int = 0, receiver: int = 0, **kw: object) -> Message:
    return decode(buf, world_size=world_size, link=_link(sender, receiver), **kw)  # type: ignore[arg-type]


def _tensor_from_raw(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).clone()


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(torch.uint8).numpy())


def _error(buf: object, world_size: int = 1, sender: int = 0, receiver: int = 0, **kw: object) -> WireError:
    with pytest.raises(WireError) as info:
        decode(buf, world_size=world_size, link=_link(sender, receiver), **kw)  # type: ignore[arg-type]
    assert info.value.reason in REJECT_REASONS
    return info.value


def _reason(buf: object, **kw: object) -> str:
    return _error(buf, **kw).reason  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ strategies


@st.composite
def cases(draw: st.DrawFn, kinds: list[Kind] | None = None, max_numel: int = 24) -> tuple:
    """(message, raw payload bytes, world_size, key, receiver, seq)."""
    world = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(kinds or list(Kind)))
    sender = draw(st.integers(0, world - 1))
    receiver = draw(st.integers(0, world - 1))
    origin = draw(st.integers(0, world - 1))
    lo = hi = 0
    if kind == Kind.GRADIENT:
        lo = draw(st.integers(0, I64 - 1))
        hi = draw(st.integers(lo + 1, I64))
    elif kind in (Kind.FINAL, Kind.MARKER):
        lo = hi = draw(st.integers(0, I64))
    elif kind == Kind.MODEL:
        lo = draw(st.integers(0, I64))
        hi = draw(st.integers(lo, I64))
    payload, raw = None, b""
    if kind in (Kind.GRADIENT, Kind.MODEL):
        dtype = draw(st.sampled_from(DTYPES))
        numel = draw(st.integers(0, max_numel))
        raw = draw(st.binary(min_size=numel * ITEMSIZE[dtype], max_size=numel * ITEMSIZE[dtype]))
        payload = _tensor_from_raw(raw, dtype)
    clock = None
    if draw(st.booleans()):
        clock = np.array(draw(st.lists(st.integers(0, I64), min_size=world, max_size=world)), np.int64)
    key = draw(st.one_of(st.none(), st.binary(min_size=1, max_size=64)))
    seq = draw(st.integers(0, U64))
    return Message(kind, sender, origin, lo, hi, payload, clock), raw, world, key, receiver, seq


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
    assert WIRE_VERSION == 2
    # magic, 4 bytes, 4 u32, 5 u64, nonce, digest, crc, reserved, tag
    assert HEADER_SIZE == 4 + 4 * 1 + 4 * 4 + 5 * 8 + 16 + 32 + 4 + 4 + 32 == 152
    assert TAG_SIZE == 32
    # 10 float32 + 4 clock entries; the tag field is always there, signed or not
    assert (
        encoded_size(10, torch.float32, 4, True) == encoded_size(10, torch.float32, 4, False) == 152 + 32 + 40
    )
    assert encoded_size(0, None, 0, False) == 152
    assert encoded_size(3, torch.bfloat16, 0, False) == 158
    assert encoded_size(1000, torch.float64, 2, detached=True) == 152 + 16
    with pytest.raises(WireUsageError):
        encoded_size(3, None, 0, False)
    with pytest.raises(WireUsageError):
        encoded_size(3, torch.int32, 0, False)


def test_encode_matches_hand_built_bytes() -> None:
    msg = Message(
        Kind.GRADIENT, 1, 2, 7, 9, torch.tensor([1.0, -2.0], dtype=torch.float32), np.array([3, 4, 5])
    )
    got = encode(msg, link=Link(NONCE, 1, 2), seq=5)
    assert got[:4] == b"DSGD" and got[4:8] == bytes([2, 1, 1, 0])
    assert got[8:12] == b"\x01\0\0\0" and got[12:16] == b"\x02\0\0\0"  # sender, receiver
    assert got[16:20] == b"\x02\0\0\0" and got[20:24] == b"\x03\0\0\0"  # origin, n_clock
    assert got[24:32] == b"\x05" + b"\0" * 7  # seq
    assert got[48:56] == b"\x02" + b"\0" * 7  # numel
    assert int.from_bytes(got[56:64], "little") == len(got) == 152 + 24 + 8
    assert got[64:80] == NONCE and got[80:112] == b"\0" * 32
    assert got[116:152] == b"\0" * 36  # reserved and an unsigned message's tag
    assert got[152:160] == b"\x03" + b"\0" * 7
    # IEEE-754 little-endian: 1.0 = 0x3f800000, -2.0 = 0xc0000000
    assert got[176:184] == bytes.fromhex("0000803f000000c0")
    assert got == _reference_bytes(
        kind=1,
        sender=1,
        receiver=2,
        origin=2,
        seq=5,
        lo=7,
        hi=9,
        code=1,
        payload_bytes=got[176:],
        numel=2,
        clock=[3, 4, 5],
    )


# ------------------------------------------------------------------------------------------ round trips


@FAST
@given(cases())
def test_round_trip_every_kind_and_dtype(case: tuple) -> None:
    msg, raw, world, key, receiver, seq = case
    data = _enc(msg, key, receiver, seq)
    assert data == _ref_from_msg(msg, key, raw, receiver, seq)
    dtype = None if msg.payload is None else msg.payload.dtype
    numel = 0 if msg.payload is None else msg.payload.numel()
    n_clock = 0 if msg.clock is None else world
    assert len(data) == encoded_size(numel, dtype, n_clock, key is not None)
    got = _dec(
        data, world, msg.sender, receiver, key=key, seq=seq, expected_numel=numel, expected_dtype=dtype
    )
    _check_same(got, msg, raw)


@FAST
@given(cases(), st.integers(0, 200), st.binary(min_size=1, max_size=1))
def test_encode_into_oversized_buffer_then_decode_whole_buffer(case: tuple, extra: int, fill: bytes) -> None:
    msg, raw, world, key, receiver, seq = case
    want = _ref_from_msg(msg, key, raw, receiver, seq)
    out = torch.full((len(want) + extra,), fill[0], dtype=torch.uint8)
    n = encode_into(msg, out, key, link=_link(msg.sender, receiver), seq=seq)
    assert n == len(want)
    assert bytes(out[:n].numpy()) == want
    assert bytes(out[n:].numpy()) == fill * extra  # nothing written past the message
    for buf in (out, bytes(out.numpy()), bytearray(out.numpy()), memoryview(out.numpy())):
        _check_same(_dec(buf, world, msg.sender, receiver, key=key, seq=seq), msg, raw)


def test_decoded_payload_owns_its_memory() -> None:
    msg = Message(Kind.MODEL, 0, 0, payload=torch.arange(8, dtype=torch.float64), clock=np.array([5]))
    buf = bytearray(_enc(msg))
    got = _dec(buf)
    buf[152:] = b"\xff" * (len(buf) - 152)
    assert torch.equal(got.payload, torch.arange(8, dtype=torch.float64))
    assert got.clock.tolist() == [5]
    assert got.clock.flags.writeable and got.clock.flags.owndata


def test_large_float32_payload_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(100_000, generator=gen) * 1e3
    msg = Message(Kind.GRADIENT, 3, 1, 10, 42, values, np.arange(4, dtype=np.int64))
    data = _enc(msg, b"secret", receiver=2)
    assert len(data) == 152 + 32 + 400_000
    got = _dec(data, 4, 3, 2, expected_numel=100_000, expected_dtype=torch.float32, key=b"secret", seq=1)
    assert torch.equal(got.payload, values)
    assert got.payload.numpy().tobytes() == values.numpy().tobytes()


def test_non_contiguous_and_multi_dim_payloads_go_in_c_order() -> None:
    base = torch.arange(24, dtype=torch.float32)
    for t, want in (
        (base[::3], [0, 3, 6, 9, 12, 15, 18, 21]),
        (base.reshape(4, 6).t(), [0, 6, 12, 18, 1, 7, 13, 19, 2, 8, 14, 20, 3, 9, 15, 21, 4, 10, 16, 22]),
    ):
        msg = Message(Kind.GRADIENT, 0, 0, 0, 1, t)
        got = _dec(_enc(msg))
        assert got.payload.tolist()[: len(want)] == [float(v) for v in want]
        out = torch.zeros(512, dtype=torch.uint8)
        n = encode_into(msg, out, link=_link(), seq=1)
        assert bytes(out[:n].numpy()) == _enc(msg)


def test_empty_clock_and_empty_payload() -> None:
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.empty(0, dtype=torch.float16), np.zeros(0, np.int64))
    got = _dec(_enc(msg), 2)
    assert got.clock is None  # zero entries means "no clock" on the wire
    assert got.payload is not None and got.payload.numel() == 0 and got.payload.dtype == torch.float16


# ------------------------------------------------------------------------------------------ ids (issue 6)


def test_ids_stop_at_what_an_int64_clock_holds() -> None:
    """The largest legal id is 2**63-2 (hi = 2**63-1, the largest count an int64 clock holds); an id range
    that reaches 2**63 is refused by the decoder and never produced by the encoder."""
    top = Message(Kind.GRADIENT, 0, 0, I64 - 1, I64, torch.ones(2))
    got = _dec(_enc(top), expected_numel=2)
    assert (got.lo, got.hi) == (2**63 - 2, 2**63 - 1)
    np.zeros(1, dtype=np.int64)[0] = got.hi  # what the worker does with it: fits
    assert _dec(_enc(Message(Kind.FINAL, 0, 0, I64, I64))).hi == I64
    for lo, hi in ((I64, I64 + 1), (2**63, 2**63 + 1), (0, 2**63), (0, U64), (U64 - 1, U64)):
        data = _reference_bytes(
            kind=1, sender=0, origin=0, lo=lo, hi=hi, code=1, payload_bytes=b"\0" * 4, numel=1
        )
        err = _error(data, seq=1)
        assert err.reason == "bad_range" and "2**63-1" in str(err)
        assert err.in_sequence  # refused after the link's checks: the sequence number is used up
        with pytest.raises(WireUsageError, match="does not fit the wire field"):
            _enc(Message(Kind.GRADIENT, 0, 0, lo, hi, torch.ones(1)))
    for kind in (2, 5):  # FINAL counts and MODEL tags go into int64 fields too
        data = _reference_bytes(
            kind=kind,
            sender=0,
            origin=0,
            lo=2**63,
            hi=2**63,
            code=1 if kind == 5 else 0,
            payload_bytes=b"\0" * 4 if kind == 5 else b"",
            numel=1 if kind == 5 else 0,
        )
        assert _reason(data) == "bad_range"


def test_a_worker_takes_the_largest_legal_id_without_overflow() -> None:
    from dasgd.core.topology import complete
    from dasgd.worker.worker import Worker

    algorithms = pytest.importorskip("dasgd.algorithms.dasgd")
    worker = Worker(0, 2, torch.nn.Linear(2, 1), complete(2), algorithms.DASGD(), 0.1)
    n = worker.params.numel()
    msg = _dec(_enc(Message(Kind.GRADIENT, 1, 1, I64 - 1, I64, torch.zeros(n)), receiver=0), 2, 1, 0)
    worker.receive([msg])  # a gap at the very end of the id space: held, not applied, and no OverflowError


# ------------------------------------------------------------------------------------------ rejection


def _sample(signed: bool) -> tuple[bytes, bytes | None, dict[str, tuple[int, int]]]:
    key = b"k3y" if signed else None
    msg = Message(Kind.GRADIENT, 1, 0, 4, 6, torch.tensor([1.5, -0.25, 3.0]), np.array([2, 9]))
    data = _enc(msg, key, receiver=0)
    regions = {"header": (0, 152), "clock": (152, 168), "payload": (168, 180)}
    assert len(data) == 180
    return data, key, regions


@pytest.mark.parametrize("signed", [False, True])
def test_every_truncation_is_rejected(signed: bool) -> None:
    data, key, regions = _sample(signed)
    seen = set()
    for name, (start, stop) in regions.items():
        for cut in range(start, stop):
            assert _reason(data[:cut], world_size=2, sender=1, key=key) == "truncated", (name, cut)
            seen.add(name)
    assert seen == set(regions)


@pytest.mark.parametrize("signed", [False, True])
def test_every_single_byte_flip_is_rejected(signed: bool) -> None:
    """Every bit of a message is covered: the crc and, signed, the HMAC cover all but the tag, and the tag
    is checked by the HMAC (signed) or must be zero (unsigned)."""
    data, key, _ = _sample(signed)
    expected_early = {0: "bad_magic", 1: "bad_magic", 2: "bad_magic", 3: "bad_magic", 4: "bad_version"}
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF, 0x5A):
            bad = bytearray(data)
            bad[pos] ^= mask
            reason = _reason(bytes(bad), world_size=2, sender=1, key=key)
            if pos in expected_early:
                assert reason == expected_early[pos]
            elif 120 <= pos < 152:
                assert reason == ("auth" if signed else "bad_flags"), (pos, reason)
            else:
                assert reason in ("bad_flags", "bad_dtype", "shape", "bad_length", "truncated", "checksum"), (
                    pos,
                    mask,
                    reason,
                )


@FAST
@given(cases(max_numel=6), st.data())
def test_random_flip_of_random_message_never_accepted(case: tuple, data: st.DataObject) -> None:
    msg, _, world, key, receiver, seq = case
    buf = bytearray(_enc(msg, key, receiver, seq))
    pos = data.draw(st.integers(0, len(buf) - 1))
    buf[pos] ^= data.draw(st.integers(1, 255))
    _error(bytes(buf), world_size=world, sender=msg.sender, receiver=receiver, key=key)


def test_wrong_magic_and_versions() -> None:
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, magic=b"DSGE")) == "bad_magic"
    assert _reason(b"GET / HTTP/1.1\r\n" + b"x" * 200) == "bad_magic"
    for version in (0, 1, 3, 255):
        data = _reference_bytes(kind=3, sender=0, origin=0, version=version)
        assert _reason(data) == "bad_version"


def test_authentication() -> None:
    msg = Message(Kind.STOP, 0, 1)
    signed = _enc(msg, b"alpha", receiver=1)
    assert _reason(signed, world_size=2, receiver=1, key=b"beta") == "auth"
    assert _reason(_enc(msg, receiver=1), world_size=2, receiver=1, key=b"alpha") == "auth"  # missing tag
    assert _reason(signed, world_size=2, receiver=1) == "auth"  # a tag where this worker has no key
    assert _dec(signed, 2, 0, 1, key=b"alpha").kind == Kind.STOP
    # a forger without the key recomputes the crc after editing the sender: crc passes, HMAC does not
    forged = _reference_bytes(kind=3, sender=1, origin=1, key=b"guess")
    assert _reason(forged, world_size=2, sender=1, key=b"alpha") == "auth"
    # an unsigned message must not carry a tag
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, tag=b"\1" * 32)) == "bad_flags"


def test_the_tag_covers_nonce_link_and_sequence() -> None:
    """A key holder's message cannot be moved to another run, link or position: each field is signed."""
    msg = Message(Kind.STOP, 0, 0)
    key = b"k"
    good = _reference_bytes(kind=3, sender=0, origin=0, receiver=1, seq=4, key=key)
    assert _dec(good, 3, 0, 1, key=key, seq=4).kind == Kind.STOP
    assert good == _enc(msg, key, receiver=1, seq=4)
    # Edit one bound field, fix the crc, keep the old tag: the HMAC no longer matches.
    tag = good[120:152]
    for field in ({"nonce": OTHER_NONCE}, {"receiver": 2}, {"seq": 5}):
        fields: dict = {"kind": 3, "sender": 0, "origin": 0, "receiver": 1, "seq": 4, "key": key, **field}
        edited = _reference_bytes(**fields, tag=tag)
        assert _reason(edited, world_size=3, receiver=fields["receiver"], key=key) == "auth", field


def test_wrong_run_link_and_sequence() -> None:
    msg = Message(Kind.GRADIENT, 1, 0, 3, 4, torch.ones(2))
    for key in (None, b"k"):
        data = _enc(msg, key, receiver=2, seq=7)
        assert _dec(data, 3, 1, 2, key=key, seq=7).lo == 3
        # recorded in another run (same key): the nonce differs
        other_run = encode(msg, key, link=Link(OTHER_NONCE, 1, 2), seq=7)
        err = _error(other_run, world_size=3, sender=1, receiver=2, key=key, seq=7)
        assert err.reason == "wrong_run" and err.header is not None and not err.in_sequence
        # on another link
        assert _reason(data, world_size=3, sender=0, receiver=2, key=key) == "wrong_sender"
        assert _reason(data, world_size=3, sender=1, receiver=0, key=key) == "wrong_receiver"
        # replayed (or reordered): any number but the expected one
        for expected in (6, 8, 1000):
            err = _error(data, world_size=3, sender=1, receiver=2, key=key, seq=expected)
            assert err.reason == "replay" and not err.in_sequence and err.header.seq == 7


def test_unknown_sender_receiver_or_origin() -> None:
    msg = Message(Kind.FINAL, 3, 0, 5, 5)
    assert _dec(_enc(msg), 4, 3).sender == 3
    assert _reason(_enc(msg), world_size=3, sender=3) == "unknown_sender"
    assert _reason(_enc(Message(Kind.FINAL, 0, 7, 5, 5)), world_size=4) == "unknown_sender"
    assert _reason(_reference_bytes(kind=3, sender=2**32 - 1, origin=0), world_size=4) == "unknown_sender"
    assert _reason(_reference_bytes(kind=3, sender=0, receiver=9, origin=0), world_size=4) == "unknown_sender"


@pytest.mark.parametrize(
    ("kind", "lo", "hi", "payload"),
    [
        (1, 5, 5, True),
        (1, 6, 5, True),
        (2, 3, 4, False),
        (3, 0, 1, False),
        (4, 1, 0, False),
        (5, 3, 2, True),  # MODEL: lo <= hi is a tag; lo > hi is invalid
        (7, 3, 4, False),  # MARKER: lo == hi is the checkpoint id
        (7, 0, 2**63, False),  # and bounded as every id is
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
    assert _reason(data) == "bad_range"
    with pytest.raises(WireUsageError):  # the encoder refuses to produce it
        _enc(Message(Kind(kind), 0, 0, lo, hi, torch.zeros(2) if payload else None))


def test_shape_and_dtype_rules() -> None:
    grad = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(5, dtype=torch.float16))
    data = _enc(grad)
    assert _reason(data, expected_numel=6) == "shape"
    assert _reason(data, expected_dtype=torch.float32) == "bad_dtype"
    assert _dec(data, expected_numel=5, expected_dtype=torch.float16).payload.numel() == 5
    # control messages have no payload, so expectations about payloads do not apply to them
    stop = _enc(Message(Kind.STOP, 0, 0))
    assert _dec(stop, expected_numel=6, expected_dtype=torch.float32).payload is None
    # GRADIENT without payload, STOP with one
    assert _reason(_reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1)) == "shape"
    with_payload = _reference_bytes(kind=3, sender=0, origin=0, code=5, payload_bytes=b"ab", numel=2)
    assert _reason(with_payload) == "shape"
    # unknown dtype codes, and "no payload" with elements
    assert _reason(_reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, code=6)) == "bad_dtype"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, numel=1)) == "shape"


def test_bad_kind_flags_length_and_clock() -> None:
    for kind in (0, UNKNOWN_KIND, 255):  # 0 is a HELLO: only ever the first message of a link
        assert _reason(_reference_bytes(kind=kind, sender=0, origin=0)) == "bad_kind"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, flags=2)) == "bad_flags"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, flags=8)) == "bad_flags"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, reserved=1)) == "bad_flags"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, digest=b"\1" * 32)) == "bad_flags"
    long = _reference_bytes(kind=3, sender=0, origin=0, total_length=153) + b"\0"
    assert _reason(long) == "bad_length"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, total_length=2**64 - 1)) == "bad_length"
    # huge counts that stay consistent with total_length: rejected before anything is allocated
    huge = _reference_bytes(
        kind=1, sender=0, origin=0, lo=0, hi=1, code=2, numel=2**40, total_length=152 + 8 * 2**40
    )
    assert _reason(huge) == "truncated"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2, 3]), world_size=2) == "bad_clock"
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, clock=[1, -1]), world_size=2) == "bad_clock"
    assert _dec(_reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2]), 2).clock.tolist() == [1, 2]
    assert _reason(_reference_bytes(kind=3, sender=0, origin=0, fix_crc=False)) == "checksum"


def test_errors_after_authentication_carry_the_header_and_whether_the_sequence_moved() -> None:
    # before authentication: nothing to trust
    err = _error(_reference_bytes(kind=3, sender=0, origin=0, fix_crc=False), seq=1)
    assert err.header is None and not err.in_sequence
    # authentic, in sequence, refused afterwards: the number is used up
    err = _error(_reference_bytes(kind=3, sender=0, origin=0, seq=1, clock=[1, 2, 3]), world_size=2, seq=1)
    assert err.reason == "bad_clock" and err.in_sequence and err.header.seq == 1 and err.header.kind == 3
    # no sequence check asked for: nothing is used up
    err = _error(_reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2, 3]), world_size=2)
    assert not err.in_sequence


# ------------------------------------------------------------------------------------------ fuzzing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 8), st.one_of(st.none(), st.just(b"key")))
def test_random_garbage_only_raises_wire_error(blob: bytes, world: int, key: bytes | None) -> None:
    _reason(blob, world_size=world, key=key)
    # the same garbage behind a valid magic and version gets further into the checks
    _reason(b"DSGD\x02" + blob, world_size=world, key=key)
    with pytest.raises(WireError):
        check_hello(
            b"DSGD\x02" + blob,
            link=_link(0, 0),
            key=key,
            world_size=world,
            numel=4,
            dtype=torch.float32,
            spec_digest=bytes(32),
        )


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 7),
    st.integers(0, 2**32 - 1) | st.integers(0, 4),
    st.integers(0, 2**32 - 1) | st.integers(0, 4),
    st.integers(0, 2**32 - 1) | st.integers(0, 4),
    st.integers(0, U64) | st.integers(0, 4),
    st.integers(0, U64) | st.integers(0, 4),
    st.integers(0, U64) | st.integers(0, 4),
    st.integers(0, 4),
    st.integers(0, 6),
    st.sampled_from([NONCE, OTHER_NONCE]),
    st.binary(min_size=32, max_size=32) | st.just(b"\0" * 32),
    st.binary(max_size=80),
)
def test_well_checksummed_random_headers_never_crash(
    kind: int,
    code: int,
    flags: int,
    sender: int,
    receiver: int,
    origin: int,
    seq: int,
    lo: int,
    hi: int,
    n_clock: int,
    numel: int,
    nonce: bytes,
    digest: bytes,
    rest: bytes,
) -> None:
    """Headers with valid magic, version, length and crc but random fields (the v2 header's new fields too:
    receiver, seq, nonce, digest, the digest flag) reach the semantic checks; whatever the combination, the
    result is a Message or a WireError, and an accepted message holds what the checks promise."""
    dtype_by_code = {v: k for k, v in CODES.items()}
    detached = bool(flags & 2)
    carried = 0 if detached else numel * ITEMSIZE[dtype_by_code.get(code)]
    body_len = 152 + 8 * n_clock + carried
    signed = bool(flags & 1)
    tail = ((rest or b"\x07") * (body_len + 1))[: body_len - 152]
    data = _reference_bytes(
        kind=kind,
        sender=sender,
        receiver=receiver,
        origin=origin,
        seq=seq,
        lo=lo,
        hi=hi,
        code=code,
        payload_bytes=tail,
        numel=numel,
        flags=flags,
        n_clock=n_clock,
        total_length=body_len,
        nonce=nonce,
        digest=digest,
        key=b"x" if signed else None,
    )
    for key in (None, b"x"):
        try:
            res = decode_detached(data, world_size=4, link=_link(1, 2), key=key, seq=3)
        except WireError as err:
            assert err.reason in REJECT_REASONS
        else:
            got = res.message
            assert isinstance(got, Message) and got.sender == 1 and 0 <= got.origin < 4
            assert res.header.receiver == 2 and res.header.seq == 3 and res.header.nonce == NONCE
            assert got.lo <= MAX_ID and got.hi <= MAX_ID
            assert res.header.signed == (key is not None)


# ------------------------------------------------------------------------------------------ usage errors


def test_usage_errors_are_value_errors() -> None:
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(4))
    with pytest.raises(ValueError, match="needs 168"):
        encode_into(msg, torch.zeros(167, dtype=torch.uint8), link=_link(), seq=1)
    with pytest.raises(ValueError):
        encode_into(msg, torch.zeros(200, dtype=torch.float32), link=_link(), seq=1)
    with pytest.raises(ValueError):
        _enc(Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(4, dtype=torch.int32)))
    with pytest.raises(ValueError):
        _enc(Message(Kind.STOP, 0, 0, clock=np.array([-1, 0])))
    with pytest.raises(ValueError):
        _enc(msg, key=b"")
    with pytest.raises(WireUsageError):
        decode("not bytes", world_size=1, link=_link())  # type: ignore[arg-type]
    assert not issubclass(WireUsageError, WireError)


def test_links_and_sequence_numbers_are_checked_as_arguments() -> None:
    msg = Message(Kind.STOP, 0, 0)
    assert _usage(encode, msg, link=Link(b"short", 0, 0), seq=1) == (
        "the run nonce must be 16 bytes, got b'short'"
    )
    assert (
        _usage(encode, msg, link=(NONCE, 0), seq=1)
        == "link must be a Link(nonce, sender, receiver), got tuple"
    )
    assert _usage(encode, msg, link=Link(NONCE, 0, -1), seq=1) == (
        "link receiver -1 does not fit the wire field (0..4294967295)"
    )
    assert (
        _usage(encode, msg, link=_link(), seq=-1)
        == "seq=-1 does not fit the wire field (0..18446744073709551615)"
    )
    assert _usage(encode, msg, link=_link(), seq=2**64) == (
        "seq=18446744073709551616 does not fit the wire field (0..18446744073709551615)"
    )
    assert _usage(encode, msg, link=_link(1, 0), seq=1) == (
        "message sender 0 is not the link's sender 1; a worker only sends as itself"
    )
    assert encode(msg, link=_link(), seq=U64)[24:32] == b"\xff" * 8
    grad = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.ones(3))
    assert _usage(encode, grad, b"k", link=_link(), seq=1, detached=True, digest=False) == (
        "a signed message must carry its detached payload's digest; pass digest=True"
    )


# ------------------------------------------------------------------------------------------ detached payloads
# Flags bit 1: the header announces a payload that travels on its own (the Gloo transport's payload tag, or
# the split plane's data groups); bit 2: the digest field holds its SHA-256 (signed) or crc32 (unsigned).


def _ref_detached(msg: Message, key: bytes | None, receiver: int, seq: int, digest: bool = True) -> bytes:
    dtype = msg.payload.dtype
    raw = _raw(msg.payload.reshape(-1))
    if not digest:
        field = b"\0" * 32
    elif key is not None:
        field = hashlib.sha256(raw).digest()
    else:
        field = zlib.crc32(raw).to_bytes(4, "little") + b"\0" * 28
    return _reference_bytes(
        kind=int(msg.kind),
        sender=msg.sender,
        receiver=receiver,
        origin=msg.origin,
        seq=seq,
        lo=msg.lo,
        hi=msg.hi,
        code=CODES[dtype],
        numel=msg.payload.numel(),
        clock=None if msg.clock is None else [int(v) for v in msg.clock],
        key=key,
        flags=2 | (4 if digest else 0) | (1 if key is not None else 0),
        digest=field,
    )


@FAST
@given(cases(kinds=[Kind.GRADIENT, Kind.MODEL], max_numel=40))
def test_detached_round_trip(case: tuple) -> None:
    msg, raw, world, key, receiver, seq = case
    data = _enc(msg, key, receiver, seq, detached=True)
    assert data == _ref_detached(msg, key, receiver, seq)
    n_clock = 0 if msg.clock is None else world
    numel = msg.payload.numel()
    want_len = 152 + 8 * n_clock  # no payload bytes, whatever numel is
    assert len(data) == want_len == encoded_size(numel, msg.payload.dtype, n_clock, detached=True)
    out = torch.full((want_len + 7,), 0xAB, dtype=torch.uint8)
    assert encode_into(msg, out, key, link=_link(msg.sender, receiver), seq=seq, detached=True) == want_len
    assert bytes(out[:want_len].numpy()) == data and bytes(out[want_len:].numpy()) == b"\xab" * 7

    got, detached, got_numel, got_dtype, header = decode_detached(
        data, world_size=world, link=_link(msg.sender, receiver), key=key, seq=seq
    )
    assert detached and got_numel == numel and got_dtype == msg.payload.dtype
    _check_same(got, Message(msg.kind, msg.sender, msg.origin, msg.lo, msg.hi, None, msg.clock), b"")
    verify_payload(header, _tensor_from_raw(raw, msg.payload.dtype))  # the bytes that were hashed
    # decode with allow_detached gives the same message, and the expectations apply to the declared payload
    alt = _dec(
        data,
        world,
        msg.sender,
        receiver,
        key=key,
        allow_detached=True,
        expected_numel=numel,
        expected_dtype=msg.payload.dtype,
    )
    assert alt.payload is None and (alt.lo, alt.hi, alt.sender) == (msg.lo, msg.hi, msg.sender)


@FAST
@given(cases(max_numel=8))
def test_decode_detached_accepts_inline_messages_and_says_so(case: tuple) -> None:
    msg, raw, world, key, receiver, seq = case
    res = decode_detached(
        _enc(msg, key, receiver, seq), world_size=world, link=_link(msg.sender, receiver), key=key
    )
    assert not res.detached
    _check_same(res.message, msg, raw)
    if msg.payload is None:
        assert (res.numel, res.dtype) == (0, None)
    else:
        assert (res.numel, res.dtype) == (msg.payload.numel(), msg.payload.dtype)


def test_detached_header_bytes_by_hand() -> None:
    payload = torch.arange(1000, dtype=torch.float64)
    msg = Message(Kind.GRADIENT, 2, 1, 5, 9, payload, np.array([7, 0, 3]))
    data = _enc(msg, receiver=0, detached=True)
    assert data[4:8] == bytes([2, 1, 2, 6])  # version, kind GRADIENT, dtype float64, flags: detached + digest
    assert int.from_bytes(data[48:56], "little") == 1000  # numel says what the payload transfer carries
    assert int.from_bytes(data[56:64], "little") == len(data) == 152 + 24
    crc = zlib.crc32(payload.numpy().tobytes())
    assert data[80:112] == crc.to_bytes(4, "little") + b"\0" * 28  # unsigned: the payload's crc32
    body = data[:112] + b"\0\0\0\0" + data[116:120] + b"\0" * 32 + data[152:]
    assert int.from_bytes(data[112:116], "little") == zlib.crc32(body)  # header crc: header and clock
    signed = _enc(msg, b"k", receiver=0, detached=True)
    assert signed[7] == 7 and len(signed) == 176
    assert signed[80:112] == hashlib.sha256(payload.numpy().tobytes()).digest()
    assert (
        signed[120:152] == hmac.new(b"k", signed[:120] + b"\0" * 32 + signed[152:], hashlib.sha256).digest()
    )
    # without a digest (the split plane's unsigned CUDA payloads): flags bit 2 clear, field zero
    bare = _enc(msg, receiver=0, detached=True, digest=False)
    assert bare[7] == 2 and bare[80:112] == b"\0" * 32


def test_a_detached_payload_is_checked_against_its_header() -> None:
    """Issue 12, item 9: the payload that travels on its own is bound by the (signed) header's digest."""
    payload = torch.arange(6, dtype=torch.float32)
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, payload)
    for key in (None, b"k"):
        head = decode_detached(_enc(msg, key, detached=True), world_size=1, link=_link(), key=key).header
        verify_payload(head, payload.clone())
        altered = payload.clone()
        altered[3] += 1
        with pytest.raises(WireError) as info:
            verify_payload(head, altered)
        assert info.value.reason == "bad_digest"
        for wrong, reason in ((torch.zeros(5), "shape"), (torch.zeros(6, dtype=torch.float64), "bad_dtype")):
            with pytest.raises(WireError) as info:
                verify_payload(head, wrong)
            assert info.value.reason == reason
    # no digest announced: only the shape can be checked (integrity is the data plane's)
    head = decode_detached(_enc(msg, detached=True, digest=False), world_size=1, link=_link()).header
    verify_payload(head, torch.full((6,), -1.0))
    with pytest.raises(WireUsageError):
        verify_payload(decode_detached(_enc(msg), world_size=1, link=_link()).header, payload)


def test_detached_flag_is_refused_by_default() -> None:
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.ones(4))
    data = _enc(msg, detached=True)
    assert _reason(data) == "bad_flags"
    assert _reason(_enc(msg, b"key", detached=True), key=b"key") == "bad_flags"
    assert _dec(data, allow_detached=True).payload is None
    # unknown bits stay unknown even where the detached bit is allowed, and the digest bit needs a payload
    for flags in (4, 8, 0x80):
        data = _reference_bytes(
            kind=1, sender=0, origin=0, lo=0, hi=1, code=1, numel=4, flags=flags | (flags == 4)
        )
        with pytest.raises(WireError) as info:
            decode_detached(data, world_size=1, link=_link())
        assert info.value.reason == "bad_flags"


def test_detached_crc_covers_header_and_clock_only() -> None:
    msg = Message(Kind.MODEL, 1, 1, payload=torch.ones(3), clock=np.array([4, 5]))
    data = _enc(msg, detached=True)
    assert len(data) == 152 + 16
    expected_early = {0: "bad_magic", 1: "bad_magic", 2: "bad_magic", 3: "bad_magic", 4: "bad_version"}
    for pos in range(len(data)):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(WireError) as info:
            decode_detached(bytes(bad), world_size=2, link=_link(1, 0))
        reason = info.value.reason
        if pos in expected_early:
            assert reason == expected_early[pos]
        else:
            assert reason in ("bad_flags", "bad_dtype", "shape", "bad_length", "checksum"), (pos, reason)
            # a flip of the ranks, seq, ids, numel, nonce or the digest's crc changes no length (n_clock at
            # 20..23 does): only the crc can catch it, and does
            if 8 <= pos < 20 or 24 <= pos < 56 or 64 <= pos < 84 or pos >= 152:
                assert reason == "checksum", (pos, reason)
    # bytes after total_length are not part of the message: a receive buffer may hold anything there
    got = decode_detached(data + b"\xff" * 100, world_size=2, link=_link(1, 0))
    assert got.detached and got.numel == 3 and got.message.clock.tolist() == [4, 5]


def test_detached_authentication() -> None:
    msg = Message(Kind.GRADIENT, 0, 1, 2, 3, torch.ones(6, dtype=torch.float16))
    signed = _enc(msg, b"alpha", detached=True)
    assert decode_detached(signed, world_size=2, link=_link(), key=b"alpha").numel == 6
    with pytest.raises(WireError, match="auth"):
        decode_detached(signed, world_size=2, link=_link(), key=b"beta")
    # a forger without the key changes numel and fixes the crc: the HMAC still catches it
    forged = _reference_bytes(
        kind=1, sender=0, origin=1, lo=2, hi=3, code=3, numel=7, flags=7, key=b"guess", digest=b"\1" * 32
    )
    with pytest.raises(WireError) as info:
        decode_detached(forged, world_size=2, link=_link(), key=b"alpha")
    assert info.value.reason == "auth"
    # a signed detached payload must carry its digest
    no_digest = _reference_bytes(
        kind=1, sender=0, origin=1, lo=2, hi=3, code=3, numel=6, flags=3, key=b"alpha"
    )
    with pytest.raises(WireError) as info:
        decode_detached(no_digest, world_size=2, link=_link(), key=b"alpha")
    assert info.value.reason == "auth" and "digest" in str(info.value)


def test_detached_rules() -> None:
    grad = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(5, dtype=torch.float16))
    data = _enc(grad, detached=True)
    for kw, reason in (({"expected_numel": 6}, "shape"), ({"expected_dtype": torch.float32}, "bad_dtype")):
        with pytest.raises(WireError) as info:
            decode_detached(data, world_size=1, link=_link(), **kw)
        assert info.value.reason == reason
        assert info.value.header is not None and info.value.header.detached  # the transport learns that
    # a huge declared numel allocates nothing: it is only reported, for the caller to refuse
    huge = _reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, code=2, numel=2**60, flags=2)
    assert decode_detached(huge, world_size=1, link=_link()).numel == 2**60
    # the detached bit on a message that has no payload, with or without a dtype code
    stop = _reference_bytes(kind=3, sender=0, origin=0, flags=2)
    no_code = _reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, flags=2)
    ctrl_code = _reference_bytes(kind=3, sender=0, origin=0, code=1, numel=2, flags=2)
    for bad in (stop, no_code, ctrl_code):
        with pytest.raises(WireError) as info:
            decode_detached(bad, world_size=1, link=_link())
        assert info.value.reason == "shape"
    # a detached header that counts payload bytes in its length is a length error
    long = _reference_bytes(
        kind=1, sender=0, origin=0, lo=0, hi=1, code=1, numel=2, flags=2, total_length=160
    )
    with pytest.raises(WireError) as info:
        decode_detached(long + b"\0" * 8, world_size=1, link=_link())
    assert info.value.reason == "bad_length"
    # an unsigned digest is a crc32: the rest of the field is zero
    crc_tail = _reference_bytes(
        kind=1, sender=0, origin=0, lo=0, hi=1, code=1, numel=2, flags=6, digest=b"\1" * 32
    )
    with pytest.raises(WireError) as info:
        decode_detached(crc_tail, world_size=1, link=_link())
    assert info.value.reason == "bad_flags"
    # the encoder refuses to detach nothing
    with pytest.raises(WireUsageError):
        _enc(Message(Kind.FINAL, 0, 0, 3, 3), detached=True)
    with pytest.raises(WireUsageError):
        encode_into(
            Message(Kind.STOP, 0, 0), torch.zeros(200, dtype=torch.uint8), link=_link(), seq=1, detached=True
        )


def test_detached_encode_without_digest_does_not_touch_payload_values() -> None:
    """With digest=False only numel and dtype are read: a non-contiguous payload is not gathered, and its
    values do not matter."""
    base = torch.arange(30, dtype=torch.float32).reshape(5, 6).t()  # non-contiguous
    a = _enc(Message(Kind.GRADIENT, 0, 0, 0, 1, base), detached=True, digest=False)
    b = _enc(Message(Kind.GRADIENT, 0, 0, 0, 1, torch.full((30,), -1.0)), detached=True, digest=False)
    assert a == b and int.from_bytes(a[48:56], "little") == 30
    # with the digest, the C-order bytes of the non-contiguous payload are what is hashed
    c = _enc(Message(Kind.GRADIENT, 0, 0, 0, 1, base), b"k", detached=True)
    assert c[80:112] == hashlib.sha256(base.contiguous().numpy().tobytes()).digest()


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 255),
    st.integers(0, 7),
    st.integers(0, 7),
    st.integers(0, 5),
    st.integers(0, 4),
    st.integers(0, 2**64 - 1) | st.integers(0, 8),
    st.binary(max_size=40),
    st.binary(min_size=32, max_size=32),
)
def test_random_detached_headers_never_crash(
    kind: int, code: int, flags: int, sender: int, n_clock: int, numel: int, rest: bytes, digest: bytes
) -> None:
    signed = bool(flags & 1)
    body_len = 152 + 8 * n_clock
    tail = ((rest or b"\x01") * (body_len + 1))[: body_len - 152]
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
        total_length=body_len,
        key=b"x" if signed else None,
        digest=digest if flags & 4 else b"\0" * 32,
    )
    try:
        res = decode_detached(data, world_size=4, link=_link(sender % 4, 0), key=b"x" if signed else None)
    except WireError as err:
        assert err.reason in REJECT_REASONS
    else:
        assert res.detached and res.message.payload is None and res.dtype is not None
        assert res.numel == numel and res.message.kind in (Kind.GRADIENT, Kind.MODEL)


# ------------------------------------------------------------------------------------------ HELLO


_MINE = {"world_size": 4, "numel": 1000, "dtype": torch.float32, "spec_digest": b"S" * 32}


def _hello(**over: object) -> bytes:
    args: dict = {"link": Link(NONCE, 2, 1), "key": b"k", **_MINE, **over}
    return encode_hello(**args)


def _refusal(data: bytes, **over: object) -> WireError:
    args: dict = {"link": Link(NONCE, 2, 1), "key": b"k", **_MINE, **over}
    with pytest.raises(WireError) as info:
        check_hello(data, **args)
    return info.value


def test_a_hello_is_one_header_with_the_senders_settings() -> None:
    data = _hello()
    assert len(data) == HEADER_SIZE
    want = _reference_bytes(
        kind=0,
        sender=2,
        receiver=1,
        origin=2,
        seq=0,
        lo=4,
        hi=0,
        code=1,
        numel=1000,
        total_length=152,
        digest=b"S" * 32,
        key=b"k",
    )
    assert data == want
    head = check_hello(data, link=Link(NONCE, 2, 1), key=b"k", **_MINE)
    assert (head.kind, head.lo, head.numel, head.dtype, head.digest) == (0, 4, 1000, torch.float32, b"S" * 32)
    assert check_hello(_hello(key=None), link=Link(NONCE, 2, 1), key=None, **_MINE).signed is False


def test_a_hello_refuses_each_difference_by_name() -> None:
    """Issue 12, item 8: version, key, run, link, world size, payload and spec digest each refused, named."""
    good = _hello()
    cases = [
        (
            _reference_bytes(
                kind=0, sender=2, receiver=1, origin=2, seq=0, lo=4, version=3, total_length=152
            ),
            {},
            "bad_version",
            "wire version 3, this build speaks 2",
        ),
        (_hello(key=None), {}, "auth", "unsigned message but a shared secret is set"),
        (good, {"key": None}, "auth", "signed message but this worker has no shared secret"),
        (good, {"key": b"other"}, "auth", "HMAC tag does not match"),
        (_hello(link=Link(OTHER_NONCE, 2, 1)), {}, "wrong_run", "run nonce differs"),
        (good, {"link": Link(NONCE, 3, 1)}, "wrong_sender", "sender 2 on the link from 3"),
        (good, {"link": Link(NONCE, 2, 0)}, "wrong_receiver", "addressed to 1, received by 0"),
        (_hello(world_size=3), {}, "spec_mismatch", "world size 3 there, 4 here"),
        (
            _hello(numel=999),
            {},
            "spec_mismatch",
            "payload 999 x torch.float32 there, 1000 x torch.float32 here",
        ),
        (
            _hello(dtype=torch.float64),
            {},
            "spec_mismatch",
            "1000 x torch.float64 there, 1000 x torch.float32 here",
        ),
        (
            _hello(spec_digest=b"T" * 32),
            {},
            "spec_mismatch",
            "spec digest 545454545454... there, 535353535353...",
        ),
        (_enc(Message(Kind.STOP, 2, 2), b"k", receiver=1, seq=0), {}, "bad_kind", "must open with a HELLO"),
    ]
    for data, over, reason, text in cases:
        err = _refusal(data, **over)
        assert err.reason == reason and text in str(err), (reason, str(err))
    replayed = _reference_bytes(
        kind=0,
        sender=2,
        receiver=1,
        origin=2,
        seq=1,
        lo=4,
        code=1,
        numel=1000,
        total_length=152,
        digest=b"S" * 32,
        key=b"k",
    )
    assert _refusal(replayed).reason == "replay"


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 151), st.integers(1, 255))
def test_a_damaged_hello_is_refused(pos: int, mask: int) -> None:
    bad = bytearray(_hello())
    bad[pos] ^= mask
    assert _refusal(bytes(bad)).reason in REJECT_REASONS


# ------------------------------------------------------------------------------------------ exact reasons
# A rejection is counted by its reason and logged with its detail: the detail must name the numbers that
# were wrong. Each case below is built by the reference encoder; the expected text is worked out by hand
# from the bytes (lengths, codes, fields), not copied from the module's output.

# Five float16 zeros (code 3, 2 bytes each), from the reference encoder: nothing of the module runs at import.
_GRAD_F16 = _reference_bytes(
    kind=1, sender=0, origin=0, lo=0, hi=1, code=3, payload_bytes=b"\0" * 10, numel=5
)


def _rejection(buf: object, **kw: object) -> str:
    err = _error(buf, **kw)  # type: ignore[arg-type]
    text = str(err)
    assert text.startswith(f"rejected message ({err.reason}): ")
    return text


_REJECTIONS = [
    (b"DSGD" + b"\0" * 6, {}, "(truncated): 10 bytes, fewer than the 152-byte header"),
    (
        _reference_bytes(kind=3, sender=0, origin=0, magic=b"DSGE"),
        {},
        "(bad_magic): starts with b'DSGE', not b'DSGD': not a dasgd message",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, version=1),
        {},
        "(bad_version): wire version 1, this build speaks 2; run the same dasgd everywhere",
    ),
    (_reference_bytes(kind=3, sender=0, origin=0, flags=8), {}, "(bad_flags): unknown flag bits 0x08"),
    (
        _reference_bytes(kind=1, sender=0, origin=0, lo=0, hi=1, code=1, numel=4, flags=2),
        {},
        "(bad_flags): detached payload (flags bit 1) but whole messages are expected here; decode headers "
        "of detached payloads with allow_detached=True or decode_detached()",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, flags=4),
        {},
        "(bad_flags): a payload digest (flags bit 2) but no detached payload",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, reserved=5),
        {},
        "(bad_flags): reserved field is 0x5, must be 0",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, tag=b"\0" * 31 + b"\1"),
        {},
        "(bad_flags): unsigned message (flags bit 0 clear) with a non-zero tag field",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, digest=b"\0" * 31 + b"\1"),
        {},
        "(bad_flags): digest field set but no payload digest is announced",
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
        _reference_bytes(kind=3, sender=0, origin=0, total_length=153) + b"\0",
        {},
        "(bad_length): total_length 153 but the header implies 152 bytes",
    ),
    (  # a STOP with a 2-entry clock is 152 + 16 = 168 bytes; one is missing
        _reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2])[:167],
        {"world_size": 2},
        "(truncated): message is 168 bytes but only 167 arrived",
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
        _reference_bytes(kind=3, sender=0, origin=0, key=b"k"),
        {},
        "(auth): signed message but this worker has no shared secret; give every worker the same key",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, key=b"guess"),
        {"key": b"k"},
        "(auth): HMAC tag does not match: forged, or the workers' secrets differ",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, nonce=OTHER_NONCE),
        {},
        "(wrong_run): the message belongs to another run (run nonce differs): recorded, or a stray worker",
    ),
    (
        _reference_bytes(kind=3, sender=0, receiver=4, origin=0),
        {"world_size": 4},
        "(unknown_sender): sender 0 / receiver 4 outside a world of 4 workers",
    ),
    (
        _reference_bytes(kind=3, sender=1, origin=0),
        {"world_size": 2},
        "(wrong_sender): sender 1 on the link from 0",
    ),
    (
        _reference_bytes(kind=3, sender=0, receiver=1, origin=0),
        {"world_size": 2},
        "(wrong_receiver): addressed to 1, received by 0",
    ),
    (
        _reference_bytes(kind=3, sender=0, origin=0, seq=3),
        {"seq": 4},
        "(replay): sequence number 3 on a link that expects 4: replayed or reordered",
    ),
    (_reference_bytes(kind=255, sender=0, origin=0), {}, "(bad_kind): unknown message kind 255"),
    (  # origin == world_size is already outside: workers are 0..3
        _reference_bytes(kind=2, sender=0, origin=4, lo=5, hi=5),
        {"world_size": 4},
        "(unknown_sender): origin 4 outside a world of 4 workers",
    ),
    (
        _reference_bytes(kind=2, sender=0, origin=0, lo=2**63, hi=2**63),
        {},
        "(bad_range): id range [9223372036854775808, 9223372036854775808) goes past 2**63-1, the largest "
        "count a vector clock holds",
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
    data = _enc(msg)
    empty = "the shared secret is empty; pass key=None to disable authentication"
    not_bytes = "the shared secret must be bytes, got str"
    for call, args in ((encode, (msg,)), (encode_into, (msg, out)), (decode, (data,))):
        kw: dict = {"world_size": 1, "link": _link()} if call is decode else {"link": _link(), "seq": 1}
        assert _usage(call, *args, key=b"", **kw) == empty
        assert _usage(call, *args, key="k", **kw) == not_bytes
    assert _usage(decode, data, world_size=0, link=_link()) == "world_size must be >= 1, got 0"
    assert _usage(decode, data, world_size=1, link=_link(), expected_dtype=torch.int32) == (
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
            "message lo=-1 does not fit the wire field (0..9223372036854775807)",
        ),
        (
            Message(Kind.MODEL, 0, 0, 0, 2**63, torch.ones(1)),
            "message hi=9223372036854775808 does not fit the wire field (0..9223372036854775807)",
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
    link = Link(NONCE, msg.sender if isinstance(msg.sender, int) and msg.sender >= 0 else 0, 0)
    assert _usage(encode, msg, link=link, seq=1) == want
    assert _usage(encode_into, msg, torch.zeros(300, dtype=torch.uint8), link=link, seq=1) == want


def test_nothing_to_detach_is_a_usage_error_with_its_reason() -> None:
    assert _usage(encode, Message(Kind.FINAL, 0, 0, 3, 3), link=_link(), seq=1, detached=True) == (
        "FINAL has no payload to detach; encode it with detached=False (only GRADIENT and MODEL payloads "
        "travel on their own)"
    )


def test_output_and_input_buffers_are_checked_with_their_description() -> None:
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, torch.zeros(4))  # 152 + 16 bytes, signed or not
    kw: dict = {"link": _link(), "seq": 1}
    assert _usage(encode_into, msg, bytearray(200), **kw) == "out must be a torch.Tensor, got bytearray"
    for out, desc in (
        (torch.zeros(10, 20, dtype=torch.uint8), "torch.uint8 shape (10, 20)"),
        (torch.zeros(400, dtype=torch.uint8)[::2], "torch.uint8 shape (200,)"),
        (torch.zeros(100, dtype=torch.float32), "torch.float32 shape (100,)"),
    ):
        assert _usage(encode_into, msg, out, **kw) == (
            f"out must be a contiguous 1-D uint8 CPU tensor, got {desc} on cpu; "
            "allocate it with torch.empty(n, dtype=torch.uint8)"
        )
    # a buffer one byte short is refused before anything is written
    assert _usage(encode_into, msg, torch.zeros(167, dtype=torch.uint8), b"k", **kw) == (
        "out holds 167 bytes but the message needs 168; size it with encoded_size()"
    )
    data = _enc(msg)
    assert _usage(decode, "not bytes", world_size=1, link=_link()) == (
        "decode needs bytes, bytearray, memoryview or a uint8 tensor, got str"
    )
    for buf, desc in (
        (torch.zeros(100, dtype=torch.float32), "torch.float32 shape (100,)"),
        (torch.zeros(2, 168, dtype=torch.uint8), "torch.uint8 shape (2, 168)"),
        (torch.frombuffer(bytearray(data * 2), dtype=torch.uint8)[::2], "torch.uint8 shape (168,)"),
    ):
        assert _usage(decode, buf, world_size=1, link=_link()) == (
            f"a tensor buffer must be a contiguous 1-D uint8 CPU tensor, got {desc} on cpu"
        )
    # A strided typed view cannot be read as bytes in place.
    strided = np.frombuffer(data * 2, dtype=np.uint16)[::2]
    assert _usage(decode, strided, world_size=1, link=_link()) == "decode needs a C-contiguous byte buffer"


def test_typed_and_multi_dimensional_receive_buffers_decode_as_bytes() -> None:
    # The layout keeps clock and payload 8-byte aligned so that a receive buffer may be a typed array; the
    # decoder must read it as bytes whatever the element type or shape.
    msg = Message(
        Kind.GRADIENT, 1, 0, 4, 6, torch.tensor([1.5, -0.25, 3.0], dtype=torch.float64), np.array([2, 9])
    )
    data = _enc(msg, b"k")  # 152 + 16 + 24 = 192 bytes
    raw = _raw(msg.payload)
    for buf in (
        np.frombuffer(data, dtype=np.float64),
        np.frombuffer(data, dtype=np.int32),
        np.frombuffer(data, dtype=np.uint8).reshape(2, 96),
        memoryview(data).cast("B", (4, 48)),
    ):
        _check_same(_dec(buf, 2, 1, key=b"k"), msg, raw)


def test_encoder_field_limits_are_inclusive() -> None:
    top_u32 = 2**32 - 1
    assert encode(Message(Kind.STOP, top_u32, top_u32), link=Link(NONCE, top_u32, top_u32), seq=U64) == (
        _reference_bytes(kind=3, sender=top_u32, receiver=top_u32, origin=top_u32, seq=U64)
    )
    assert _enc(Message(Kind.FINAL, 0, 0, I64, I64)) == _reference_bytes(
        kind=2, sender=0, origin=0, lo=I64, hi=I64
    )


def test_a_clock_may_fill_its_count_field_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    # The n_clock field is a u32; a real 2^32-entry clock takes 32 GiB, so the field's limit is lowered here
    # to check the boundary: as many entries as the field holds is fine, one more is refused.
    import dasgd.core.wire as wire_module

    monkeypatch.setattr(wire_module, "_U32_MAX", 3)
    three = Message(Kind.STOP, 0, 0, clock=np.array([1, 2, 3]))
    assert _enc(three) == _reference_bytes(kind=3, sender=0, origin=0, clock=[1, 2, 3])
    four = Message(Kind.STOP, 0, 0, clock=np.array([1, 2, 3, 4]))
    assert _usage(encode, four, link=_link(), seq=1) == "clock has 4 entries, more than the wire allows"


def test_strided_payload_into_a_misaligned_buffer_is_staged_correctly() -> None:
    # out starts at an odd address, so the payload bytes cannot be viewed as float32 in place: the encoder
    # falls back to a staging copy, and the bytes must still be exactly encode()'s.
    payload = torch.arange(24, dtype=torch.float32)[::3]
    msg = Message(Kind.GRADIENT, 0, 0, 0, 1, payload, np.array([5]))
    out = torch.zeros(400, dtype=torch.uint8)[1:]
    n = encode_into(msg, out, link=_link(), seq=1)
    assert bytes(out[:n].numpy()) == _enc(msg)
    assert _dec(out).payload.tolist() == [0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0]


def test_a_strided_buffer_is_refused_as_a_usage_error_not_a_buffer_error() -> None:
    """A non-contiguous 1-D byte view (every other byte of a valid message) is a caller's mistake."""
    data = _enc(Message(Kind.GRADIENT, 0, 0, 0, 1, torch.ones(4)))
    doubled = bytes(b for pair in zip(data, data, strict=True) for b in pair)
    for strided in (memoryview(doubled)[::2], np.frombuffer(doubled, dtype=np.uint8)[::2]):
        with pytest.raises(WireUsageError, match="C-contiguous"):
            _dec(strided)
    assert _dec(bytes(memoryview(doubled)[::2])).hi == 1  # copied, it decodes


def test_a_checkpoint_marker_round_trips_and_is_bounded() -> None:
    msg = Message(Kind.MARKER, 1, 1, 9, 9)
    back = _dec(_enc(msg), 2, 1, 0)
    assert (back.kind, back.sender, back.origin, back.lo, back.hi, back.payload) == (Kind.MARKER, 1, 1, 9, 9, None)
    with pytest.raises(WireUsageError, match="checkpoint id"):
        _enc(Message(Kind.MARKER, 0, 0, 1, 2))
    with pytest.raises(WireUsageError, match="payload=None"):
        _enc(Message(Kind.MARKER, 0, 0, 1, 1, torch.ones(1)))
    assert _reason(_reference_bytes(kind=7, sender=0, origin=0, lo=1, hi=1, code=1, payload_bytes=b"\0" * 4, numel=1)) == "shape"
